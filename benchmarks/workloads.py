"""Benchmark workloads: deterministic token-id batches with fixed output lengths.

A workload is a name, a builder `(tokenizer, rng) -> list of prompt token-id lists`, and
the number of tokens every request must generate (greedy, EOS ignored), so every engine
does exactly the same amount of work. Builders draw from one fixed numpy seed and from
the English text below, never from the network, so a batch is identical run to run.

To add a workload (shared-prefix shapes: docqa, gsp, batchllm_micro, nosharing), write a
builder from the helpers here (`token_stream`, `window`) and add it to WORKLOADS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

SEED = 20240611

# Varied English registers (narrative, technical, news, recipe, dialogue, legal, science)
# so prompts do not repeat one style; written for this file, no external corpus needed.
PASSAGES: tuple[str, ...] = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps out of "
    "habit rather than need. There were one hundred and twelve of them, worn smooth in the middle by a "
    "century of boots. At the top he wiped the salt from the glass, trimmed the wick, and watched the "
    "fishing boats turn for home as the beam swept slowly across the grey water.",
    "To install the package, create a virtual environment, activate it, and run the installer with the "
    "editable flag. If the build fails with a missing compiler error, install the platform's development "
    "tools first. Configuration lives in a single file at the project root; every option has a default, "
    "so most users only need to set the model path and the number of worker threads.",
    "City officials announced on Tuesday that the riverside park will close for three months while "
    "engineers replace the flood barriers installed in the nineteen seventies. The mayor said the work "
    "was overdue after last spring's storms pushed water into the lower streets, and promised that the "
    "playground and the weekend market would reopen before the start of the summer holidays.",
    "Preheat the oven to one hundred and eighty degrees. Cream the butter and sugar until pale, then beat "
    "in the eggs one at a time, adding a spoonful of flour with the last egg to stop the mixture curdling. "
    "Fold in the remaining flour, the lemon zest and a splash of milk, pour into a lined tin, and bake for "
    "forty minutes or until a skewer comes out clean.",
    "\"Are you sure this is the right road?\" she asked, squinting at the map. \"Positive,\" he said, "
    "although he was not. The hedges had grown taller since he last drove this way, and the farmhouse he "
    "remembered as a landmark had been painted a different colour. \"We will know in a mile or two,\" he "
    "added, which was the closest he came to admitting anything.",
    "The tenant shall keep the premises in good repair and condition, fair wear and tear excepted, and "
    "shall not make any structural alteration without the prior written consent of the landlord, such "
    "consent not to be unreasonably withheld. Rent is payable monthly in advance on the first day of each "
    "month by bank transfer to the account nominated by the landlord in writing.",
    "Photosynthesis converts light energy into chemical energy stored in sugars. In the light-dependent "
    "reactions, chlorophyll absorbs photons and splits water, releasing oxygen and producing the energy "
    "carriers that drive the Calvin cycle. There, carbon dioxide from the air is fixed into three-carbon "
    "molecules that the plant assembles into glucose, starch and cellulose.",
    "Markets opened lower this morning as investors weighed a stronger than expected jobs report against "
    "fears that interest rates will stay high for longer. Technology shares led the decline, while energy "
    "companies gained on rising oil prices. Analysts cautioned that trading volumes were thin ahead of the "
    "holiday weekend and that a single large order could move prices sharply.",
    "A hash table stores key and value pairs in an array of buckets. A hash function maps each key to a "
    "bucket index; when two keys land in the same bucket, the table resolves the collision by chaining "
    "entries in a list or by probing for the next free slot. With a good hash function and a load factor "
    "kept below a fixed threshold, lookups and inserts take constant time on average.",
    "The expedition reached the base of the glacier on the ninth day. Wind had scoured the snow from the "
    "ice, leaving a blue surface ridged like a frozen sea. They roped together, checked each other's "
    "crampons, and began the ascent in silence, each person listening for the deep crack that would mean "
    "a crevasse was opening somewhere beneath them.",
    "Dear customer, thank you for your order. Your parcel has been dispatched and should arrive within "
    "three to five working days. You can follow its progress with the tracking number below. If anything "
    "is missing or damaged, reply to this message within fourteen days and we will arrange a replacement "
    "or a full refund at no extra cost to you.",
    "Historians still argue about why the ancient city was abandoned. Some point to a long drought visible "
    "in the layers of lake sediment; others to a shift in trade routes that left its harbour without "
    "ships. The most recent excavations found storerooms emptied in an orderly way, which suggests that "
    "the inhabitants left by choice rather than fleeing in a single catastrophe.",
)


def token_stream(tokenizer: Any, repeats: int = 4) -> list[int]:
    """All passages tokenized and shuffled into one long stream (fixed order per repeat),
    so random windows cut across registers instead of repeating one passage."""
    rng = np.random.default_rng(SEED)
    ids: list[int] = []
    for _ in range(repeats):
        for index in rng.permutation(len(PASSAGES)):
            ids.extend(tokenizer(PASSAGES[index] + "\n\n", add_special_tokens=False).input_ids)
    return ids


def window(stream: list[int], length: int, rng: np.random.Generator) -> list[int]:
    """A random contiguous slice of `length` tokens."""
    start = int(rng.integers(0, len(stream) - length))
    return stream[start : start + length]


def build_mixed(tokenizer: Any, rng: np.random.Generator, count: int = 48, low: int = 40, high: int = 300) -> list[list[int]]:
    """Independent prompts of uniform random length in [low, high]: no shared prefixes."""
    stream = token_stream(tokenizer)
    lengths = rng.integers(low, high + 1, size=count)
    return [window(stream, int(n), rng) for n in lengths]


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[Any, np.random.Generator], list[list[int]]]
    max_tokens: int  # every request generates exactly this many tokens
    description: str

    def prompts(self, tokenizer: Any) -> list[list[int]]:
        return self.build(tokenizer, np.random.default_rng(SEED))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("mixed", build_mixed, 32, "48 independent prompts, 40-300 tokens (uniform), 32 output tokens"),
        # Seconds, not minutes: checks the harness itself; `--workload all` skips it.
        Workload("smoke", lambda tok, rng: build_mixed(tok, rng, 6, 20, 60), 4, "harness check: 6 prompts, 4 tokens"),
    )
}


def load_tokenizer() -> Any:
    """The default model's tokenizer, without building an engine."""
    from transformers import AutoTokenizer

    from treebatch.models.loader import load_model

    return AutoTokenizer.from_pretrained(load_model(None).tokenizer_path)
