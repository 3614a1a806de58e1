"""``dataorder score``: train short runs and write per-example difficulty scores.

Example::

    $ dataorder score --data digits --model mlp --scores el2n,grand,loss,forgetting,aum,datamap \\
          --runs 5 --epochs 20 --score-epoch 10 --out scores/digits
"""

from __future__ import annotations

import argparse

from dataorder.cli.checks import check_device
from dataorder.cli.errors import UsageError

SCORES = "el2n,grand,loss,confidence,margin,entropy,forgetting,aum,datamap"
_DEFAULT = "el2n,grand,loss,forgetting,aum,datamap"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits",
                        help="digits, a save_to_disk directory, or a .parquet/.csv/.npz file (default: digits)")
    parser.add_argument("--model", default=None,
                        help="logreg | mlp | cnn | lm-tiny | package.module:factory (default: mlp; lm-tiny for text)")
    parser.add_argument("--scores", default=None,
                        help=f"comma-separated, from {SCORES} (default: {_DEFAULT}; text: loss,el2n, or also grand)")
    parser.add_argument("--runs", type=int, default=5, help="training runs (seeds seed..seed+runs-1) (default: 5)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (default: 20)")
    parser.add_argument("--score-epoch", type=int, default=10,
                        help="epoch after which the functional scores are taken; 0 = at init (default: 10)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (reused to resume)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    parser.add_argument("--label-column", default=None,
                        help="label column of a file or dataset (default: label; not for digits)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes of a file's labels (default: ClassLabel size or largest label + 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--score-batch-size", type=int, default=256, help="batch size of the scoring pass")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0, help="seed of run 0; run r uses seed + r (default: 0)")
    parser.add_argument("--grand-params", default="all",
                        help="parameters whose gradient GraNd measures: all, last, or comma-separated names")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    text = parser.add_argument_group("images and text (see docs/scoring-text.md)",
                                     "each flag, like --label-column and --num-classes, is refused for "
                                     "data it does not apply to")
    text.add_argument("--image-size", type=int, default=None, help="resize images to N x N (default: their own size)")
    text.add_argument("--text-column", default=None, help="the documents' column (default: text)")
    text.add_argument("--tokenizer", default=None, help="package.module:callable, str -> list of ids (default: bytes)")
    text.add_argument("--context", type=int, default=None, help="tokens predicted per window (default: 128)")
    text.add_argument("--windows", choices=("split", "truncate"), default=None,
                      help="split each document into windows, or keep its first window only (default: split)")
    text.add_argument("--reference-split", type=float, default=None, metavar="FRACTION",
                      help="train on this random fraction of the documents and score the rest")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from dataorder.modalities import load_score_input
    from dataorder.scores import runner
    from dataorder.scores.text import DEFAULT_TEXT_SCORES

    try:
        config = runner.ScoreConfig(
            model=args.model or "mlp",
            scores=tuple(s.strip() for s in (args.scores or _DEFAULT).split(",") if s.strip()), runs=args.runs,
            epochs=args.epochs, score_epoch=args.score_epoch, batch_size=args.batch_size,
            score_batch_size=args.score_batch_size, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, seed=args.seed, grand_params=args.grand_params, device=args.device)
    except runner.ScoreConfigError as error:
        raise UsageError(f"{_flag(error.field)}{error.reason}") from None
    check_device(args.device)
    try:
        data = load_score_input(args.data, label_column=args.label_column, num_classes=args.num_classes,
                                text_column=args.text_column, image_size=args.image_size, tokenizer=args.tokenizer,
                                context=args.context, windows=args.windows, reference_split=args.reference_split,
                                seed=args.seed)
    except (OSError, ValueError) as error:
        raise UsageError(f"--data {args.data}: {error}") from None
    if data.modality == "text":  # a language model and its scores unless given
        config = dataclasses.replace(config, model=args.model or "lm-tiny", scores=config.scores if args.scores
                                     else DEFAULT_TEXT_SCORES)
    try:
        result = runner.score_dataset(data.x, data.y, data.num_classes, config, args.out, name=data.name,
                                      progress=not args.no_progress, task=data.task)
    except runner.DivergedError as error:
        raise UsageError(f"{error} (--lr {args.lr})") from None
    except runner.ScoreSetupError as error:
        raise UsageError(str(error)) from None
    if result.consistency:  # rank 0
        examples = data.task.info["examples"] if data.task is not None else len(data.y)
        print(f"dataorder score: {data.name}, {examples} examples, {config.runs} runs "
              f"({len(result.computed)} computed, {len(result.reused)} reused) -> {args.out}/scores.parquet")
        for column, report in result.consistency.items():
            spearman = report["mean_pairwise"]["spearman"]
            print(f"  {column:<22} run-vs-run Spearman {spearman:6.3f}" if spearman == spearman
                  else f"  {column:<22} (one run: no run-vs-run agreement)")
    return 0


def _flag(field: str) -> str:
    """The command-line flag of a :class:`~dataorder.scores.runner.ScoreConfig` field.

    >>> _flag("score_epoch")
    '--score-epoch'
    """
    return "--" + field.replace("_", "-")
