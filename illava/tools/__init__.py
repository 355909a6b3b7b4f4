"""illava's tools around the library: the inference CLI (`illava-run`, `run_inference_once.py`), the web demo, the
efficiency benchmark, the alignment check of the packing encoders, and the small models the tests, benchmarks and
training build."""
