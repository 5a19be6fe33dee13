from t2i.pipeline import T2IPipeline  # noqa: F401  (needs `pip install t2i`)
