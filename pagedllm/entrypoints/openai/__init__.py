"""The OpenAI-compatible HTTP server behind ``pagedllm serve``.

``api_server.build_app(engine, args)`` builds the FastAPI app around an ``AsyncLLM``;
``cli_serve`` registers the ``serve`` subcommand and runs it under uvicorn.
"""
