"""A tour of the default run's feature atlas: the queries a researcher starts with, their output
written to analysis/results/atlas_tour.md, and screenshots of the served page (headless Chromium)
in analysis/results/atlas_{index,card,text}.png.

    saekit train configs/default.yaml
    saekit atlas build runs/default
    python3 analysis/atlas_tour.py [--atlas runs/default/atlas.sqlite]
"""

import argparse
import shutil
from pathlib import Path
from urllib.parse import quote

from saekit import Atlas
from saekit.atlas_html import card_path, serve_in_thread
from saekit.io import md_table

OUT = Path(__file__).parent / "results"
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York"


def tour(atlas: Atlas) -> tuple[str, int]:
    """The markdown of the tour and the latent whose card it shows."""
    f = atlas.features()
    kings = atlas.token(" king")
    j = int(kings.sort_values("label_score").latent.iloc[-1])  # the " king" latent with the best label
    card = atlas.card(j)
    top = card.top_examples.head(5).copy()
    top["context"] = ["".join(t).replace("\n", "⏎").replace("|", "¦") for t in top.tokens]
    text = atlas.text(TEXT)
    per_token = text.groupby("position").head(1)[["position", "token", "latent", "act", "label"]]
    sections = [
        ("`atlas.features().describe()`", f[["density", "max_act", "label_score"]].describe().reset_index()),
        ("`atlas.top_by('label_score', 10)`", atlas.top_by("label_score", 10)),
        ("`atlas.token(' king')`", kings.head(10)),
        ("`atlas.search('^ [Mm]y$')`", atlas.search("^ [Mm]y$").head(10)),
        (f"`atlas.card({j}).top_examples` (label {card.label!r}, score {card.label_score:.3f})",
         top[["max_act", "peak", "context"]]),
        (f"`atlas.card({j}).logits_top`", card.logits_top),
        (f"`atlas.card({j}).neighbours` (nearest decoder rows)", card.neighbours.head(5)),
        (f"`atlas.card({j}).cooccurrence` (latents firing on the same tokens)", card.cooccurrence.head(5)),
        (f"`atlas.text({TEXT!r})`: the strongest latent per token", per_token),
    ]
    md = ["# A tour of the default run's atlas", "", f"`python3 analysis/atlas_tour.py --atlas {atlas.path}`", ""]
    for title, df in sections:
        if "label" in df:
            df = df.assign(label=[None if x is None else repr(x) for x in df.label])
        md += [f"## {title}", "", md_table(df.to_dict("records")).replace("\n\n", " "), ""]
    return "\n".join(md), j


def screenshots(atlas: Atlas, latent: int) -> None:
    """The index, one card and the text box's answer, as PNGs."""
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
                          ("text", f"{base}text.html?q={quote(TEXT)}")):
            driver.get(url)
            driver.save_screenshot(str(OUT / f"atlas_{name}.png"))
    finally:
        driver.quit()
        server.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="runs/default/atlas.sqlite")
    args = p.parse_args()
    atlas = Atlas.open(args.atlas)
    md, latent = tour(atlas)
    OUT.mkdir(exist_ok=True)
    (OUT / "atlas_tour.md").write_text(md)
    print(md)
    screenshots(atlas, latent)


if __name__ == "__main__":
    main()
