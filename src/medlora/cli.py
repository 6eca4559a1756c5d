"""`medlora`: the human actions that are not pipeline stages (STYLE principle 5).

    medlora snapshot --source synthetic|hub|original [--path DIR] [--revision REV]
    medlora restore                      # bring data/medmcqa back to what data.dvc records
    medlora promote VERSION [--force --reason TEXT]
    medlora rollback
    medlora status
    medlora ask "QUESTION" [--options "A|B|C|D"]
    medlora export --alias champion DIR
    medlora plan [--preset NAME] [--gpu-memory 80GiB]

Each command's work lives in the library module named below; this file only parses arguments, so
`medlora --help` stays fast (heavy libraries are imported by the command that needs them).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medlora.core.config import ConfigError
from medlora.core.logs import setup_logging

# command -> (module, function); the function takes the parsed arguments and returns an exit code.
HANDLERS: dict[str, tuple[str, str]] = {
    "snapshot": ("medlora.data.snapshot", "snapshot_command"),
    "restore": ("medlora.data.snapshot", "restore_command"),
    "promote": ("medlora.registry.register", "promote_command"),
    "rollback": ("medlora.registry.register", "rollback_command"),
    "status": ("medlora.registry.register", "status_command"),
    "ask": ("medlora.serving", "ask_command"),
    "export": ("medlora.serving", "export_command"),
    "plan": ("medlora.modeling.planning", "plan_command"),
}


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    module_name, function_name = HANDLERS[args.command]
    handler = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(handler(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"medlora {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
