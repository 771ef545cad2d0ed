"""The `detr` command. Each subcommand parses its arguments, then calls one API function.

Errors a user can cause (`DetrError`) print as one line on stderr with a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys

import detr
from detr.errors import DetrError


def cmd_model(args: argparse.Namespace) -> int:
    from detr.summary import describe_model

    for line in describe_model(args.config, args.set or []):
        print(line)
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from detr.data import MULTI30K_URL, fetch_multi30k

    for path in fetch_multi30k(args.to, base_url=args.url or MULTI30K_URL, langs=args.langs.split(",")):
        print(path)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from detr.config import load_config
    from detr.data import prepare

    config = load_config(args.config, args.set or [])
    report = prepare(config.data, config.train.max_tokens, args.out, config.train.seed)
    print(f"tokenizer: {report.tokenizer_path} (vocabulary src={report.src_vocab_size} tgt={report.tgt_vocab_size})")
    print(f"train: {report.examples} examples in {report.batches} batches of <= {config.train.max_tokens} tokens, "
          f"padding efficiency {report.padding_efficiency:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detr", description="detr: train, decode and inspect encoder-decoder Transformers.")
    parser.add_argument("--version", action="version", version=f"detr {detr.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    model = sub.add_parser("model", help="build a model from a config or preset; print its size and a forward pass")
    model.add_argument("config", help="a YAML config file, or a preset name (tiny, small, base, big)")
    model.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a config key, e.g. --set model.d_model=256 (repeatable)")
    model.set_defaults(func=cmd_model)

    data = sub.add_parser("data", help="data sets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = data_sub.add_parser("fetch", help="download a public data set and verify its checksums")
    fetch.add_argument("name", choices=["multi30k"])
    fetch.add_argument("--to", required=True, help="destination folder")
    fetch.add_argument("--url", help="base URL of a mirror (https://, file://)")
    fetch.add_argument("--langs", default="en,de,fr,cs", help="comma-separated languages (default: all)")
    fetch.set_defaults(func=cmd_data_fetch)
    prep = data_sub.add_parser("prepare", help="check a config's data, learn its tokenizer, report batch statistics")
    prep.add_argument("config", help="YAML config with a data section")
    prep.add_argument("--out", required=True, help="where to write tokenizer.json")
    prep.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    prep.set_defaults(func=cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except DetrError as err:
        print(f"detr: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("detr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
