"""Command line: `girandole serve | generate | keys | usage | deployment | models | lora | batch
| sftj | dpoj | rftj | rlorj`."""

from __future__ import annotations

import argparse
import difflib
import sys

from girandole.api.flag_values import env_default, folder_value


def _cmd_generate(args: argparse.Namespace) -> int:
    from girandole import SamplingParams

    try:  # checked before the model loads: a bad value names its field (max_tokens ...)
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"girandole generate: error: {exc}", file=sys.stderr)
        return 2
    from girandole import LLM  # torch and the engine: seconds, after the values are checked

    try:
        llm = LLM(model=args.model, revision=args.revision)
    except (ValueError, OSError) as exc:  # a bad or missing model, named in the message
        print(f"girandole generate: {exc}", file=sys.stderr)
        return 2
    out = llm.generate([args.prompt], params)[0]
    sys.stdout.write(args.prompt + out.text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="girandole", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt on the command line")
    gen.add_argument("prompt")
    gen.add_argument(
        "--model",
        default=None,
        help="a .gguf file, an HF folder, or a Hugging Face repo id (org/name, or"
        " org/name:file.gguf); default: Gemma 3 270M",
    )
    gen.add_argument("--revision", default=None, help="branch, tag or commit of a repo id")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_cmd_generate)

    from girandole.registry.admin_cli import add_admin_parsers

    add_admin_parsers(sub)
    from girandole.deploy.cli import add_deploy_parsers

    add_deploy_parsers(sub)
    from girandole.batch.cli import add_batch_parser

    add_batch_parser(sub)
    from girandole.finetune.cli import add_finetune_parsers

    add_finetune_parsers(sub)
    from girandole.finetune.rlor_cli import add_rlor_parser

    add_rlor_parser(sub)
    try:
        from girandole.api.server import add_serve_parser
    except ImportError:
        pass
    else:
        add_serve_parser(sub)
    return parser


def _command_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The (sub)parser of the command `args` names: `girandole deployment create` -> its own."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                return _command_parser(chosen, args)
    return parser


def _refuse_unknown(parser: argparse.ArgumentParser, extras: list[str]) -> None:
    """argparse's own refusal names the top-level usage (`girandole [-h] {generate,...}`) for a
    flag the subcommand does not know; this names the subcommand's, and the likeliest flag."""
    message = f"unrecognized arguments: {' '.join(extras)}"
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for extra in extras:
        if extra.startswith("--"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], known, n=1, cutoff=0.75)
            if close:
                message += f" (did you mean {close[0]}?)"
                break
    parser.error(message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        _refuse_unknown(_command_parser(parser, args), extras)
    cache = env_default("CACHE_DIR")  # every subcommand may write there (model/default.py)
    if cache is not None:
        try:
            folder_value("CACHE_DIR")(cache)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
