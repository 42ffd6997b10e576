"""The judge over HTTP: a Ray Serve application (``app``), its config (``config``), request bodies (``models``),
untrusted image references (``inputs``), clients (``client``: ``rms-ray judge``) and ``rms-ray eval-model``
(``eval_model``: any OpenAI-compatible chat model, judged by the service)."""
