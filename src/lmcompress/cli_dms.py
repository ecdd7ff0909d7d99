"""``lmcompress dms``: inspect a DMS checkpoint folder (``dms info``) and retrofit DMS onto a model
(``dms retrofit``)."""

from __future__ import annotations

import argparse
import json


def cmd_dms_info(args: argparse.Namespace) -> int:
    from .kv.evict.dms_config import read_settings

    settings = read_settings(args.folder)
    print(json.dumps(settings.to_config(), indent=2))
    return 0


def cmd_dms_retrofit(args: argparse.Namespace) -> int:
    from .kv.evict.dms_retrofit import RetrofitOptions, retrofit

    options = RetrofitOptions(
        ratio=args.ratio, steps=args.steps, seq_len=args.seq_len, lr=args.lr, window_size=args.window,
        alpha_scale=args.alpha_scale, initial_alpha_offset=args.alpha_offset, separate_alpha=args.separate_alpha,
        alpha_per=args.alpha_per, tau=args.tau, aux_weight=args.aux_weight, train=args.train,
        save_every=args.save_every, seed=args.seed,
    )
    summary = retrofit(args.model, args.out, options, progress=not args.quiet)
    print(json.dumps(summary))
    return 0


def add_dms_subcommands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("dms", help="DMS checkpoints: info, retrofit")
    dsub = d.add_subparsers(dest="dms_command", required=True)
    info = dsub.add_parser("info", help="validate a DMS checkpoint folder and print its DMS settings")
    info.add_argument("folder")
    info.set_defaults(func=cmd_dms_info)
    r = dsub.add_parser("retrofit", help="retrofit DMS onto a model by logit distillation (resumable)")
    r.add_argument("model", help="model name or folder (the frozen teacher and the starting student)")
    r.add_argument("out", help="output checkpoint folder (resumed from if it holds a retrofit state)")
    r.add_argument("--ratio", type=float, default=4.0, help="target compression (default 4: evict 3/4)")
    r.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    r.add_argument("--seq-len", type=int, default=256, help="tokens per step (default 256)")
    r.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 0.01)")
    r.add_argument("--window", type=int, default=16, help="dms_window_size (default 16)")
    r.add_argument("--alpha-scale", type=float, default=1.0, help="dms_alpha_scale (default 1)")
    r.add_argument("--alpha-offset", type=float, default=5.0, help="dms_initial_alpha_offset (default 5)")
    r.add_argument("--separate-alpha", action="store_true", help="a separate norm + linear decides")
    r.add_argument("--alpha-per", default="head", choices=("head", "layer"))
    r.add_argument("--tau", type=float, default=0.1, help="Gumbel-sigmoid temperature (default 0.1)")
    r.add_argument("--aux-weight", type=float, default=1.0, help="weight of the compression term (default 1)")
    r.add_argument("--train", default="decisions", choices=("decisions", "full"),
                   help="decisions (default: only the decision parameters) or full fine-tuning")
    r.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps (default 25)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_dms_retrofit)
