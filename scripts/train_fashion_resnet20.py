"""Train the shipped ResNet-20 on Fashion-MNIST and record its provenance.

Writes ``pqcompile/weights/resnet20_fashion_mnist.pt`` (a state_dict) and
``resnet20_fashion_mnist.json`` (seed, recipe, test accuracy, sha256), which
:func:`pqcompile.zoo.pretrained_resnet20_fashion` verifies when loading.

Usage: python scripts/train_fashion_resnet20.py [--epochs 6] [--threads 1] [--out DIR]

Recipe: SGD (momentum 0.9, Nesterov), OneCycle learning rate peaking at 0.1, weight decay 5e-4
on convolution/linear weights, batch 128, label smoothing 0.1, random 4-pixel-shift crops and
horizontal flips, all 60,000 training images; evaluated once at the end on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pqcompile.data import DATASETS, fashion_mnist_loaders
from pqcompile.models import resnet20
from pqcompile.zoo import file_sha256, predict

NAME = "resnet20_fashion_mnist"
EVAL_BATCH = 100  # the evaluation protocol the recorded accuracy (and its test) uses


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1, help="OneCycle peak learning rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--train-subset", type=int, default=None,
                        help="train on this many images only (smoke tests)")
    parser.add_argument("--out", type=Path, default=REPO / "pqcompile" / "weights")
    return parser.parse_args(argv)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv/linear weights only: decaying BN scales and biases hurts short schedules."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    loaders = fashion_mnist_loaders(args.batch_size, seed=args.seed, augment=True,
                                    train_subset=args.train_subset, eval_batch_size=EVAL_BATCH)
    # channels_last roughly halves the CPU step time of these small convolutions.
    model = resnet20(num_classes=10, in_channels=1).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr,
                                momentum=0.9, nesterov=True)
    steps = len(loaders.train)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps, pct_start=0.25,
        div_factor=10.0, final_div_factor=100.0)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    start, epoch_times = time.time(), []
    for epoch in range(args.epochs):
        model.train()
        tick, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        for images, labels in loaders.train:
            logits = model(images.contiguous(memory_format=torch.channels_last))
            loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        epoch_times.append(time.time() - tick)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.4f}, "
              f"train acc {100 * correct / seen:.2f}%, {epoch_times[-1]:.0f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"{NAME}.pt"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, weights)
    # Score the saved file exactly as users load it: a fresh contiguous model in eval mode.
    fresh = resnet20(num_classes=10, in_channels=1)
    fresh.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    logits, labels = predict(fresh, loaders.test)
    test_correct, test_total = int((logits.argmax(1) == labels).sum()), len(labels)
    # The smallest top-1/top-2 logit gap: how far float noise is from flipping a prediction.
    top2 = logits.topk(2, dim=1).values
    min_margin = float((top2[:, 0] - top2[:, 1]).min())
    accuracy = 100 * test_correct / test_total
    print(f"test accuracy {accuracy:.2f}% ({test_correct}/{test_total})")
    spec = DATASETS["fashion_mnist"]
    record = {
        "file": weights.name,
        "sha256": file_sha256(weights),
        "model": "pqcompile.models.resnet20(num_classes=10, in_channels=1)",
        "dataset": {"name": "fashion_mnist", "source": "Debian package dataset-fashion-mnist",
                    "train_images": args.train_subset or spec.sizes[0],
                    "input": "1x32x32, 28x28 zero-padded by 2 px",
                    "normalize": {"mean": spec.mean, "std": spec.std}},
        "seed": args.seed,
        "epochs": args.epochs,
        "recipe": {"optimizer": "SGD", "momentum": 0.9, "nesterov": True,
                   "schedule": "OneCycleLR(pct_start=0.25, div_factor=10, final_div_factor=100)",
                   "max_lr": args.lr, "weight_decay": args.weight_decay,
                   "weight_decay_on": "conv and linear weights only",
                   "batch_size": args.batch_size, "label_smoothing": args.label_smoothing,
                   "augmentation": "random crop 32 from 4-px zero padding, horizontal flip p=0.5"},
        "test_correct": test_correct,
        "test_total": test_total,
        "test_accuracy": round(accuracy, 2),
        "eval_protocol": f"pqcompile.zoo.predict: eval mode, channels_last, no_grad, "
                         f"batches of {EVAL_BATCH}, argmax of logits",
        "min_logit_margin": min_margin,
        "train_wall_s": round(time.time() - start),
        "epoch_s": [round(t) for t in epoch_times],
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {weights} and {NAME}.json")


if __name__ == "__main__":
    main()
