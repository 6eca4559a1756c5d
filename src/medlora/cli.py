"""`medlora`: the human actions that are not pipeline stages (STYLE principle 5).

    medlora snapshot --source synthetic|hub|original [--path DIR] [--revision REV]
    medlora restore                      # bring data/medmcqa back to what data.dvc records
    medlora promote VERSION [--force --reason TEXT]
    medlora rollback
    medlora status
    medlora ask "QUESTION" [--options "A|B|C|D"]
    medlora export --alias champion DIR
    medlora plan [--preset NAME] [--gpu-memory 80GiB]
    medlora replica DIR [--size tiny|small]   # the hub checkpoint's layout at CPU size, built offline

Every handler is here; the work each does lives in the library (data.snapshot, registry.promote, serving, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from medlora.core.config import ConfigError, Params, load_params
from medlora.core.stage import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)

    snapshot = commands.add_parser("snapshot", help="write data/medmcqa from a source and `dvc add` it")
    snapshot.add_argument(
        "--source",
        choices=["synthetic", "hub", "original"],
        default=None,
        help="default: snapshot.source in params",
    )
    snapshot.add_argument("--path", default=None, help="original: directory with train.json/dev.json/test.json")
    snapshot.add_argument("--revision", default=None, help="hub: dataset revision (default: snapshot.revision)")
    snapshot.add_argument("--no-dvc", action="store_true", help="write the files without `dvc add`")

    commands.add_parser("restore", help="restore data/medmcqa to what data.dvc records (cache or regenerate)")

    promote = commands.add_parser("promote", help="run the promotion gates on a registered version")
    promote.add_argument("version", help="version number of the adapter model")
    promote.add_argument("--force", action="store_true", help="promote even if gates fail (needs --reason)")
    promote.add_argument("--reason", default=None, help="why the gates were overridden (recorded)")

    commands.add_parser("rollback", help="give `champion` back to the version it replaced")
    commands.add_parser("status", help="registered versions, aliases and key metrics")

    ask = commands.add_parser("ask", help="answer a question with the champion")
    ask.add_argument("question")
    ask.add_argument("--options", default=None, help='four options separated by "|": multiple-choice mode')
    ask.add_argument("--alias", default="champion")
    ask.add_argument("--max-new-tokens", type=int, default=64)

    export = commands.add_parser("export", help="write a registered adapter with its base reference")
    export.add_argument("directory")
    export.add_argument("--alias", default="champion")

    plan = commands.add_parser("plan", help="parameter counts and training memory estimate, no download")
    plan.add_argument("--preset", default=None, help="default: model.preset in params")
    plan.add_argument("--gpu-memory", default=None, help='e.g. "80GiB": say whether training fits')
    plan.add_argument("--sequence-length", type=int, default=None)
    replica = commands.add_parser("replica", help="write an offline replica of the hub checkpoint (tests, GPU check)")
    replica.add_argument("directory")
    replica.add_argument("--size", default="tiny", help="tiny | small (see medlora.modeling.replica.REPLICA_SIZES)")
    replica.add_argument("--seed", type=int, default=0)
    return parser


# Handlers: parse nothing, print for people, return the exit code. Each imports its library module when it runs,
# so `medlora --help` stays fast (torch, transformers and mlflow take seconds to import).


def snapshot_command(params: Params, args: argparse.Namespace) -> int:
    from medlora.data.snapshot import take_snapshot

    take_snapshot(params, args.source, args.path, args.revision, add=not args.no_dvc)
    return 0


def restore_command(params: Params, args: argparse.Namespace) -> int:
    from medlora.data.snapshot import restore

    print(f"{params.paths.data_dir}: {restore(params.snapshot, params.paths.data_dir)}")
    return 0


def status_command(params: Params, args: argparse.Namespace) -> int:
    from medlora.registry.client import format_table, open_registry, status_rows

    print(format_table(status_rows(open_registry(params), params)))
    return 0


def promote_command(params: Params, args: argparse.Namespace) -> int:
    """Exit code 1 when the gates reject the version."""
    from medlora.registry.promote import promote_version

    if args.force and not args.reason:
        raise ValueError("--force needs --reason TEXT: the override is recorded on the version")
    report = promote_version(params, args.version, force_reason=args.reason if args.force else None)
    decision = report.decision + (" by force (recorded on the versions)" if report.forced else "")
    print(f"{decision}: {report.candidate} (champion before {report.champion_before})")
    for reason in report.reasons:
        print(f"  {reason}")
    return 0 if report.decision == "promoted" else 1


def rollback_command(params: Params, args: argparse.Namespace) -> int:
    from medlora.registry.promote import rollback

    print(f"champion restored: {rollback(params)}")
    return 0


def ask_command(params: Params, args: argparse.Namespace) -> int:
    from medlora.core.contracts import LETTERS
    from medlora.serving import answer_free_form, answer_multiple_choice, load_champion

    model, tokenizer = load_champion(params, args.alias)
    if args.options is None:
        print(answer_free_form(model, tokenizer, args.question, args.max_new_tokens))
        return 0
    options = [option.strip() for option in args.options.split("|")]
    best, scores = answer_multiple_choice(model, tokenizer, args.question, options, params.format.system_prompt)
    print(f"{LETTERS[best]}) {options[best]}")
    print(
        "log-likelihoods: " + ", ".join(f"{letter} {score:.3f}" for letter, score in zip(LETTERS, scores, strict=True))
    )
    return 0


def export_command(params: Params, args: argparse.Namespace) -> int:
    from medlora.serving import export_adapter

    manifest = export_adapter(params, args.alias, args.directory)
    logging.getLogger("medlora.cli").info(
        "exported %s v%s (@%s) to %s", manifest["registered_model"], manifest["version"], args.alias, args.directory
    )
    print(manifest["vllm_command"])
    return 0


def plan_command(params: Params, args: argparse.Namespace) -> int:
    """Exit code 3 when `--gpu-memory` is given and the estimate does not fit."""
    from medlora.modeling.planning import parse_memory, plan, render_plan

    report = plan(params, args.preset, args.sequence_length)
    gpu = parse_memory(args.gpu_memory) if args.gpu_memory else report["gpu"]["memory_gib"]  # else: from torch
    print(render_plan(report, gpu))
    if gpu is None:
        return 0
    key = (
        "lora_with_gradient_checkpointing"
        if params.train.gradient_checkpointing
        else "lora_without_gradient_checkpointing"
    )
    return 0 if report["memory_gib"][key]["total_gib"] <= gpu else 3


def replica_command(params: Params, args: argparse.Namespace) -> int:
    from medlora.modeling.replica import build_replica

    print(build_replica(args.directory, args.size, args.seed))
    return 0


HANDLERS: dict[str, Callable[[Params, argparse.Namespace], int]] = {
    "snapshot": snapshot_command,
    "restore": restore_command,
    "promote": promote_command,
    "rollback": rollback_command,
    "status": status_command,
    "ask": ask_command,
    "export": export_command,
    "plan": plan_command,
    "replica": replica_command,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params)
        return int(HANDLERS[args.command](params, args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"medlora {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
