"""Restarts with changed arguments: what only a restart can change in vLLM.

CUDA graphs (``--enforce-eager``), CPU offloading (``--cpu-offload-gb``, ``--kv-offloading-size``),
parallelism (``--tensor-parallel-size``), memory (``--gpu-memory-utilization``), the visible
GPUs and NCCL settings are fixed when vLLM starts. A restart strategy asks a
:class:`~.base.RestartBackend` for a new process with a patched argument list; one interface,
one module per back-end:

- :mod:`.base`: the interface, :class:`~.base.RestartRequest`, :class:`~.base.RestartError` and
  the allow-lists (only allow-listed arguments and environment variables can be changed: a token
  holder must not be able to add ``--trust-remote-code`` or a new model);
- :mod:`.args`: vLLM's argument list as data (read, patch, redact);
- :mod:`.drain`: draining vLLM through its control endpoint before a restart;
- :mod:`.process`: ``ProcessBackend``, the process ``vllm-otel supervise`` owns (real, tested
  for real); :mod:`.client`: ``HttpSupervisorBackend``, its client, what the receiver's actuator
  calls; :mod:`.cli`: the ``vllm-otel supervise`` command and its HTTP API;
- :mod:`.command`: what the next two share (exact argument lists, never a shell);
  :mod:`.compose`: ``ComposeBackend`` (docker compose); :mod:`.kubernetes`:
  ``KubernetesBackend`` (a Deployment).

Nothing is imported here: ``vllm-otel --help`` and the ``supervise`` command load only the
modules they use.
"""
