"""``vllm-otel learner``: what the learner has learnt, rebuilt from the receiver's store.

``show`` prints, per situation and strategy, attempts, successes, the posterior mean with its 90 %
interval, and the rules mined from the history; ``export`` writes the learner's state as JSON
(``show --from-json`` reads one back). Both only read the store.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run_show", "run_export"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learner", help="what the mitigation learner has learnt (from the store)",
                       description="Rebuild the receiver's learner from the outcomes in its store "
                                   "and show or export what it has learnt.")
    lsub = p.add_subparsers(dest="learner_command", metavar="ACTION", required=True)
    for name, func, helptext in (("show", run_show, "table of situations, strategies and rules"),
                                 ("export", run_export, "the learner's state as JSON (stdout)")):
        q = lsub.add_parser(name, help=helptext, description=helptext)
        q.add_argument("--config", help="policy file (its learner: section and store_url)")
        q.add_argument("--db-url", help="SQLAlchemy URL of the receiver's store (wins over the "
                                        "policy's store_url)")
        q.add_argument("--history-days", type=float, default=7.0,
                       help="outcomes this recent are replayed (default %(default)s)")
        if name == "show":
            q.add_argument("--from-json", help="show an exported state instead of the store's")
            q.add_argument("--json", action="store_true", help="machine-readable output")
        q.set_defaults(func=func)


def _learner(args: argparse.Namespace) -> Any:
    from vllm_otel.learn import make_learner

    learner_cfg: Any = None
    db_url = args.db_url
    if args.config:
        from vllm_otel.mitigate.policy import PolicyError, load_policy

        try:
            policy = load_policy(args.config)
        except PolicyError as e:
            raise SystemExit(f"vllm-otel learner: {e}") from None
        learner_cfg = policy.config.learner
        db_url = db_url or policy.config.store_url
    if getattr(args, "from_json", None):
        from vllm_otel.learn import EvidenceError

        learner = make_learner(learner_cfg)
        try:
            data = json.loads(Path(args.from_json).read_text())
            learner.import_state(data)  # type: ignore[attr-defined]
        except (OSError, ValueError, EvidenceError, AttributeError) as e:
            raise SystemExit(f"vllm-otel learner: {args.from_json}: {e}") from None
        return learner
    if not db_url:
        raise SystemExit("vllm-otel learner: give --db-url, or --config with a store_url")
    from vllm_otel.mitigate.store import Store

    store = Store(db_url)
    try:
        return make_learner(learner_cfg, store=store, history_s=args.history_days * 86400.0)
    finally:
        store.close()


def run_export(args: argparse.Namespace) -> int:
    learner = _learner(args)
    export = getattr(learner, "export_state", None)
    if not callable(export):
        print("vllm-otel learner: the rule_based learner has no state to export", file=sys.stderr)
        return 2
    json.dump(export(), sys.stdout, indent=1)
    print()
    return 0


def run_show(args: argparse.Namespace) -> int:
    from vllm_otel.learn import describe_learner

    body = describe_learner(_learner(args))
    if args.json:
        print(json.dumps(body, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"learner: {body['kind']}")
    for col in ("context", "strategy", "attempts", "successes", "posterior mean", "90 % interval",
                "dropped"):
        t.add_column(col, justify="right" if col in ("attempts", "successes", "posterior mean") else "left")
    for r in body["stats"] or []:
        lo, hi = r.get("interval") or (None, None)
        t.add_row(r.get("context", r.get("situation", "")), r["strategy"], str(r["attempts"]),
                  str(r["successes"]),
                  f"{r.get('posterior_mean', r.get('success_rate', 0.0)):.2f}",
                  "" if lo is None else f"{lo:.2f} - {hi:.2f}", "yes" if r.get("dropped") else "")
    console.print(t)
    if body["rules"]:
        console.print("rules mined from the outcomes:")
        for rule in body["rules"]:
            console.print(f"  {rule['text']}")
    else:
        console.print("no rules yet (each needs enough outcomes: learner.min_support)")
    return 0
