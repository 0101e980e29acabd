"""Offline benchmarks: ``pagedllm bench throughput`` and ``pagedllm bench latency``.

* :mod:`pagedllm.bench.datasets`: random token-id and ShareGPT workloads;
* :mod:`pagedllm.bench.presets`: config-only models (``--model-config``) with dummy weights;
* :mod:`pagedllm.bench.throughput`: offline throughput, optionally vs transformers;
* :mod:`pagedllm.bench.latency`: batch latency, decode speed vs the memory roofline, TTFT;
* :mod:`pagedllm.bench.report`: JSON, Markdown and PNG outputs;
* :mod:`pagedllm.bench.cli_bench`: the argparse registration used by ``pagedllm``.
"""
