"""``python -m vllm_otel.prestartup_check`` / ``vllm-otel check``: can vLLM start here?

Exit status 0 all ok, 1 warnings, 2 errors (usable as systemd ``ExecStartPre=``). Runs in seconds,
downloads nothing, prints no secret (it reports settings by name, never environment values other
than the interface names it checks), changes nothing unless ``--auto-fix`` (then only one env file).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

__all__ = ["add_parser", "main", "run", "check_before_start"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or hub id (only the local cache is looked at)")
    p.add_argument("--host", default="0.0.0.0", help="address vLLM will listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port vLLM will listen on (default %(default)s)")
    p.add_argument("--dtype", default="auto", help="vLLM's --dtype (default %(default)s)")
    p.add_argument("--max-model-len", type=int, help="vLLM's --max-model-len (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="concurrency (default %(default)s)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    p.add_argument("--auto-fix", action="store_true",
                   help="write the recommended settings to --env-file (and nothing else)")
    p.add_argument("--env-file", default=None, help="where --auto-fix writes (default ./vllm-otel-prestartup.env)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("vllm_command", nargs=argparse.REMAINDER,
                   help="or: -- followed by the vLLM command line, whose settings are checked")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="pre-startup check: can vLLM start here with these settings?",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_otel.prestartup import CheckOptions, options_from_vllm_argv, run_checks
    from vllm_otel.prestartup.autofix import DEFAULT_ENV_FILE, apply_fixes

    command = [a for a in (args.vllm_command or []) if a != "--"] if args.vllm_command else []
    if command:
        opts = options_from_vllm_argv(command)
    else:
        opts = CheckOptions(model=args.model, host=args.host, port=args.port, dtype=args.dtype,
                            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                            tensor_parallel_size=args.tensor_parallel_size,
                            gpu_memory_utilization=args.gpu_memory_utilization)
        space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        opts.cpu_kvcache_space_gib = float(space) if space else None
    rep = run_checks(opts)
    if args.auto_fix:
        apply_fixes(rep, opts, args.env_file or DEFAULT_ENV_FILE)
    print(rep.to_json() if args.json else rep.to_text())
    return rep.exit_code


def check_before_start(argv: Sequence[str], who: str, *, check_port: bool = True) -> bool:
    """Run the check on a vLLM command line; log the report; False when vLLM should not start
    (errors). Used by the general plugin and ``vllm-otel supervise`` when
    ``VLLM_MONITOR_PRESTARTUP_CHECK`` is on."""
    import logging

    from vllm_otel.prestartup import options_from_vllm_argv, run_checks

    log = logging.getLogger("vllm_otel")
    opts = options_from_vllm_argv(argv)
    if not check_port:
        opts.port = None
    rep = run_checks(opts)
    level = logging.ERROR if rep.exit_code == 2 else (logging.WARNING if rep.exit_code else logging.INFO)
    log.log(level, "%s: pre-startup check (exit %d):\n%s", who, rep.exit_code, rep.to_text())
    return rep.exit_code < 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_otel.prestartup_check",
                                     description="Pre-startup check: can vLLM start here with these settings?")
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
