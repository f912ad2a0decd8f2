"""A feature atlas: one SQLite file per run that says, for every latent of every hookpoint, how
often and how strongly it fires, on which contexts, what it writes to the logits, which latents
it resembles and an offline label (the token it is most characteristic of) with a score.

    build_atlas(run)                 -> RUN/atlas.sqlite, from the SAE codes of the run's activation
                                        cache (never a dense [tokens, latents])
    Atlas.open(path).card(latent)    -> one feature's card; .features(), .token(), .search(), .text()

Building (`saekit.atlas.build`), reading (`saekit.atlas.query`) and the HTML views
(`saekit.atlas.html`) are one module each.
"""

from saekit.atlas.build import add_analyses, build_atlas
from saekit.atlas.query import ATLAS_FILE, Atlas, Card

__all__ = ["ATLAS_FILE", "Atlas", "Card", "add_analyses", "build_atlas"]
