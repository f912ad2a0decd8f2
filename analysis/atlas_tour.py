"""A tour of the default run's feature atlas: the queries a researcher starts with, their output
written to analysis/results/atlas_tour.md, and screenshots of the served page (headless Chromium)
in analysis/results/atlas_{index,card,text,steer,attribution}.png.

    saekit train configs/default.yaml
    saekit atlas build runs/default
    python3 analysis/atlas_tour.py [--atlas runs/default/atlas.sqlite] [--compare 100000]

`--compare N` also builds two atlases of the run's first N training tokens, the SAE encoding in
bf16 (fp32 rescoring of each row's top candidates) and in fp32, and says which of the tour's
numbers depend on that choice of the CPU encoder.
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

import numpy as np

from saekit import Atlas
from saekit.atlas import build_atlas
from saekit.atlas.html import card_path, serve_in_thread
from saekit.io import md_table

OUT = Path(__file__).parent / "results"
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York"
STEER = "The old man said that the"
ATTRIBUTE = "Long live the"


def tour(atlas: Atlas, command: str) -> tuple[str, int]:
    """The markdown of the tour (made by `command`) and the latent whose card it shows: of the
    latents labelled " king" whose top contexts peak on it, the one whose label holds best among
    its top contexts."""
    f = atlas.features()
    kings = atlas.token(" king")
    kings = kings.assign(top_share=[atlas.card(int(j)).label_top_share for j in kings.latent])
    shares = kings[kings.label == " king"].sort_values(["top_share", "label_score"])
    j = int(shares.latent.iloc[-1])
    card = atlas.card(j)
    top = card.top_examples.head(5).copy()
    top["context"] = ["".join(t).replace("\n", "⏎").replace("|", "¦") for t in top.tokens]
    text = atlas.text(TEXT)
    per_token = text.groupby("position").head(1)[["position", "token", "latent", "act", "label"]]
    sections = [
        ("`atlas.features().describe()`", f[["density", "max_act", "label_score"]].describe().reset_index()),
        ("`atlas.top_by('label_score', 10)`", atlas.top_by("label_score", 10)),
        ("`atlas.token(' king')` (top_share: `card.label_top_share`, the label's share of the top contexts' "
         "peak tokens)", kings.head(10)),
        ("`atlas.search('^ [Mm]y$')`", atlas.search("^ [Mm]y$").head(10)),
        (f"`atlas.card({j}).top_examples` (label {card.label!r}, score {card.label_score:.3f}; "
         f"`card.label_note()`: {card.label_note()})", top[["max_act", "peak", "context"]]),
        (f"`atlas.card({j}).logits_top`", card.logits_top),
        (f"`atlas.card({j}).neighbours` (nearest decoder rows)", card.neighbours.head(5)),
        (f"`atlas.card({j}).cooccurrence` (latents firing on the same tokens)", card.cooccurrence.head(5)),
        (f"`atlas.text({TEXT!r})`: the strongest latent per token", per_token),
    ]
    paths = ", ".join(sorted(set(atlas.meta.get("encoder_path", {}).values())))
    md = ["# A tour of the default run's atlas", "", f"`{command}` (the run's CPU encoder path: {paths})", ""]
    for title, df in sections:
        if "label" in df:
            df = df.assign(label=[None if x is None else repr(x) for x in df.label])
        md += [f"## {title}", "", md_table(df.to_dict("records")).replace("\n\n", " "), ""]
    return "\n".join(md), j


def compare_paths(run: str, tokens: int) -> str:
    """Build the atlas of the first `tokens` training tokens with each CPU encoder path and say
    what differs (markdown)."""
    atlases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("bf16", "fp32"):
            os.environ["SAEKIT_ENCODER"] = path
            atlases[path] = Atlas.open(build_atlas(run, tokens=tokens, out=Path(tmp) / f"{path}.sqlite"))
        os.environ.pop("SAEKIT_ENCODER")
        a, b = (x.db for x in atlases.values())
        fa, fb = (x.features().set_index(["hookpoint", "latent"]) for x in atlases.values())
        fires = [np.array(x.execute("SELECT n_fires FROM features ORDER BY hookpoint, latent").fetchall()).ravel()
                 for x in (a, b)]
        top = [x.execute("SELECT hookpoint, latent, rank, row FROM examples WHERE kind = 'top' ORDER BY 1, 2, 3")
               .fetchall() for x in (a, b)]
        row = {"tokens": tokens, "latents": len(fa),
               "max abs diff of max_act": float((fa.max_act - fb.max_act).abs().max()),
               "max abs diff of mean_act": float((fa.mean_act - fb.mean_act).abs().max()),
               "latents whose firing count differs": int((fires[0] != fires[1]).sum()),
               "labels that differ": int((fa.label.fillna("") != fb.label.fillna("")).sum()),
               "max abs diff of label_score": float((fa.label_score - fb.label_score).abs().max()),
               "top-context rows that differ": sum(x != y for x, y in zip(*top, strict=False))
               + abs(len(top[0]) - len(top[1]))}
        for x in atlases.values():
            x.db.close()
    return md_table([{"compared (bf16 vs fp32 encoder)": k, "value": v} for k, v in row.items()])


def screenshots(atlas: Atlas, latent: int) -> None:
    """The index, one card, the text box's answer, the card's steer box answering and an attribution, as PNGs."""
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1400"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    server = serve_in_thread(atlas.path)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        for name, url in (("index", base), ("card", base + card_path(atlas.hookpoints[0], latent)),
                          ("text", f"{base}text.html?q={quote(TEXT)}"),
                          ("steer", f"{base}{card_path(atlas.hookpoints[0], latent)}?q={quote(STEER)}&v=%2B8"),
                          ("attribution", f"{base}attribute.html?q={quote(ATTRIBUTE)}&target=%20king")):
            driver.get(url)
            driver.save_screenshot(str(OUT / f"atlas_{name}.png"))
    finally:
        driver.quit()
        server.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="runs/default/atlas.sqlite")
    p.add_argument("--compare", type=int, default=None, metavar="N",
                   help="also compare the bf16 and fp32 CPU encoder paths on an atlas of N tokens")
    args = p.parse_args()
    atlas = Atlas.open(args.atlas)
    command = f"python3 analysis/atlas_tour.py --atlas {args.atlas}" + (f" --compare {args.compare}" if args.compare
                                                                          else "")
    md, latent = tour(atlas, command)
    if args.compare:
        md += ("\n## Which numbers depend on the CPU encoder path\n\nThe same SAE, atlases of the first "
               f"{args.compare:,} training tokens built with `SAEKIT_ENCODER=bf16` and `=fp32`:\n\n"
               + compare_paths(atlas.meta["run"], args.compare) + "\n")
    OUT.mkdir(exist_ok=True)
    (OUT / "atlas_tour.md").write_text(md)
    print(md)
    screenshots(atlas, latent)


if __name__ == "__main__":
    main()
