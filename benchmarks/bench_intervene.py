"""Steering and attribution cost, side by side in one process (interleaved repetitions, medians).

Generation, greedy, `--new-tokens` tokens after a short prompt, tokens/s:
  hf generate  the plain model's own generation: Hugging Face `generate` (KV cache), no SAE
  plain loop   saekit's generation loop with no splice (`steer`'s clean continuation)
  steered      the same loop with the run's SAE spliced in (error term kept) and one latent
               added at every position (`steer`'s steered continuation)
Attribution of a 64-token prompt (BOS + 63 tokens), seconds:
  fwd+bwd x    one forward of the plain model and the backward of logit[top] - logit[second] to
               the activation at the SAE's hookpoint (input gradients only, as attribution needs)
  fwd+bwd all  the same with every parameter's gradient too (`loss.backward()`)
  attribute    `saekit.intervene.attribute` over every latent of the SAE (loads the SAE and the
               atlas labels, splices, backward to the codes, builds the table)
Attribution of `--batch` IOI prompts (about 16 tokens each), seconds:
  one by one   `attribute` called once per prompt
  batched      `attribute` given the list (one right-padded forward and backward)

    python3 benchmarks/bench_intervene.py runs/default --latent 6226
    python3 benchmarks/bench_intervene.py --untrained   # an untrained SAE of the default run's shape

The cost does not depend on the weights (the same encoder matmul, k latents per position, the
same decode), so `--untrained` (9,216 latents, k 32, blocks.6.hook_resid_post, random weights)
times what the default run would take.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saekit.analyze.ioi import ioi_prompts
from saekit.intervene import _generate, _Setup, attribute
from saekit.model import _TWINS, load_model
from saekit.sae import SAE, SAEConfig
from saekit.splice import Edit

PROMPT = "The king said to the people of the city that"
TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious "
        "wreaths; our bruised arms hung up for monuments; our stern alarums changed to merry meetings, our "
        "dreadful marches to delightful measures.")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default="runs/default")
    ap.add_argument("--latent", type=int, default=0, help="the latent the steered generation adds to")
    ap.add_argument("--strength", type=float, default=8.0)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="IOI prompts attributed one by one and as a batch")
    ap.add_argument("--untrained", action="store_true", help="time an untrained SAE of the default run's shape")
    args = ap.parse_args()
    if args.untrained:
        args.run = Path(tempfile.mkdtemp()) / "sae"
        SAE(SAEConfig(576, 9216, 32, hookpoint="blocks.6.hook_resid_post", model="smollm2-135m")).save(args.run)
    lm = load_model()
    twin = _TWINS[lm]
    s = _Setup(args.run, lm)
    name, sae = s.sae(None)
    ids, mask = s.tokens(PROMPT, args.new_tokens)
    splice = s.splice([Edit(args.latent, "add", args.strength)], None, mask, error=True)
    n = args.new_tokens
    eos = None  # always n tokens

    def hf():
        with torch.no_grad():
            twin.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    gen = {"hf generate": hf, "plain loop": lambda: _generate(lm, ids, None, n, 0.0, 0, eos),
           "steered": lambda: _generate(lm, ids, splice, n, 0.0, 0, eos)}
    long = lm.tokenizer(TEXT, add_special_tokens=False).input_ids[:63]
    prompt = lm.tokenizer.decode(long)
    pids, _ = s.tokens(prompt)
    with torch.no_grad():
        top2 = twin(pids).logits[0, -1].topk(2).indices.tolist()
    target, against = top2
    layer = int(sae.cfg.hookpoint.split(".")[1])  # an SAE of blocks.N.hook_resid_post: block N's output

    def fwd_bwd(params: bool):
        def run():
            got = {}

            def grab(m, a, o):
                got["x"] = o[0] if isinstance(o, tuple) else o
                if not params:
                    got["x"] = got["x"].detach().requires_grad_()
                return (got["x"], *o[1:]) if isinstance(o, tuple) else got["x"]

            h = twin.model.layers[layer].register_forward_hook(grab)
            try:
                lg = twin(pids, use_cache=False).logits[0, -1]
                m = lg[target] - lg[against]
                if params:
                    m.backward()
                    twin.zero_grad(set_to_none=True)
                else:
                    torch.autograd.grad(m, got["x"])
            finally:
                h.remove()
        return run

    att = {"fwd+bwd x": fwd_bwd(False), "fwd+bwd all": fwd_bwd(True),
           "attribute": lambda: attribute(args.run, prompt, target, against, model=lm)}
    ioi_p = ioi_prompts(lm.tokenizer, args.batch, seed=0)
    texts, io, s_ = ioi_p.texts(), ioi_p.answer.tolist(), ioi_p.distractor.tolist()
    batch = {"one by one": lambda: [attribute(args.run, *x, model=lm) for x in zip(texts, io, s_, strict=True)],
             "batched": lambda: attribute(args.run, texts, io, s_, model=lm)}
    times = {k: [] for k in [*gen, *att, *batch]}
    for fn in [*gen.values(), *att.values(), *batch.values()]:  # warm-up
        fn()
    for _ in range(args.reps):
        for k, fn in [*gen.items(), *att.items(), *batch.items()]:
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"run {args.run} ({name}, {sae.n_latents:,} latents), {torch.get_num_threads()} threads, "
          f"{args.reps} interleaved repetitions, medians")
    print(f"\ngeneration: {n} new tokens after a {ids.shape[1]}-token prompt, greedy")
    print("| | tokens/s | / hf generate |\n|---|---:|---:|")
    for k in gen:
        print(f"| {k} | {n / med[k]:.3g} | {med['hf generate'] / med[k]:.2f} |")
    print(f"\nattribution: a {pids.shape[1]}-token prompt, all {sae.n_latents:,} latents")
    print("| | s | / fwd+bwd x |\n|---|---:|---:|")
    for k in att:
        print(f"| {k} | {med[k]:.3f} | {med[k] / med['fwd+bwd x']:.2f} |")
    print(f"\nattribution of {args.batch} IOI prompts ({ioi_p.where['end'].min() + 1}-{ioi_p.tokens.shape[1]} tokens)")
    print("| | s | prompts/s | / one by one |\n|---|---:|---:|---:|")
    for k in batch:
        print(f"| {k} | {med[k]:.3f} | {args.batch / med[k]:.3g} | {med['one by one'] / med[k]:.2f} |")


if __name__ == "__main__":
    main()
