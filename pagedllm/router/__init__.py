"""Routing requests over engine replicas (data parallelism, issue 11).

Two users share the same policies (``policies.py``, over the prefix tree of ``prefix_tree.py``):

* ``pagedllm serve -dp N``: ``AsyncLLM`` starts N engine processes and picks one per request
  from the block hashes of its tokenized prompt (the hashes the engines' prefix caches use);
* ``pagedllm router --worker-urls ...`` (``app.py``, ``cli.py``): an HTTP proxy in front of
  separately started ``pagedllm serve`` processes, routing on the request's text (it does not
  tokenize), with health checks and retries of requests that did not start.

The package imports neither torch nor the engine: the policies are plain data structures.
"""
