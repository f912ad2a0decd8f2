"""Held-out FVU of several runs on the same text none of them read: contexts FIRST..FIRST+N of the
corpus's seeded context order (the main job reads the first ~1,500, `configs/stream.yaml` the first
~4,230), so runs whose own held-out splits differ compare on one set.

    python3 analysis/unseen_fvu.py runs/default runs/stream [--first 4400] [--contexts 129]
"""

import argparse

import torch

from saekit import data
from saekit import model as lm
from saekit.evaluate import reconstruction_metrics
from saekit.run import Run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--first", type=int, default=4400, help="the first context of the set")
    ap.add_argument("--contexts", type=int, default=129, help="how many contexts (129: the main job's held-out size)")
    a = ap.parse_args()
    cfg = Run.open(a.runs[0]).config
    model = lm.load_model(cfg.model)
    tokens, mask = data.pack_contexts(data.load_texts(cfg.dataset, text_field=cfg.text_field), model.tokenizer,
                                      cfg.ctx_len, None, cfg.data_seed)
    part = slice(a.first, a.first + a.contexts)
    print(f"contexts {part.start}-{part.stop - 1} of {len(tokens)}: {int(mask[part].sum()):,} tokens")
    for path in a.runs:
        run = Run.open(path)
        for h in run.hookpoints:
            acts = torch.cat([x[h] for x in lm.harvest(model, tokens[part], mask[part], [h], batch_size=16)])
            print(f"{path} {h}: FVU {reconstruction_metrics(run.sae(h), [acts])['fvu']:.4f}")


if __name__ == "__main__":
    main()
