"""t2i.ema: the moving average of the weights that training keeps, checkpoints and exports."""
import torch

from t2i.ema import EMA


def test_one_ema_step_moves_the_average_by_one_minus_decay():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, step=1000)                          # past the warm-up: decay_t = decay
    for k, v in net.state_dict().items():
        torch.testing.assert_close(ema.shadow[k], start[k] + (1 - 0.9) * (v - start[k]))
        torch.testing.assert_close(ema.averaged(net).state_dict()[k], ema.shadow[k])
    before = {k: v.clone() for k, v in ema.shadow.items()}
    ema.update(net, step=0)                             # warm-up: decay_t = (1 + 0) / (10 + 0)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(ema.shadow[k], before[k] + (1 - 0.1) * (v - before[k]))
