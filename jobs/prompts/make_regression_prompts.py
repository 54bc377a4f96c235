"""Write jobs/prompts/regression.parquet: the nightly regression prompt set.

Varied prompts (subjects, styles, lengths, an empty unconditional prompt, non-ASCII text), fixed
seeds (edge values included), a few negative prompts, sizes, step counts and guidance scales, so a
change in the text encoder, UNet, VAE, sampler or seeding shows up somewhere. Deterministic: running
it again writes the same rows. Usage: python jobs/prompts/make_regression_prompts.py [OUT]
"""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    "a lighthouse on a cliff at dawn, oil painting",
    "a red bicycle leaning against a brick wall",
    "portrait of an old fisherman, dramatic lighting, 85mm photo",
    "isometric pixel art of a tiny island with palm trees",
    "a bowl of ramen, top-down food photography",
    "a watercolor fox in a snowy forest",
    "futuristic city skyline at night, neon reflections in the rain",
    "a cat astronaut floating inside a space station",
    "macro photo of a dew drop on a spider web",
    "an ancient map of an imaginary continent, sepia",
    "",  # unconditional
    "minimalist logo of a mountain, flat vector, two colors",
    "a crowded medieval market, highly detailed, wide angle",
    "Ein Segelboot auf einem ruhigen See bei Sonnenuntergang",
    "富士山と桜、浮世絵風",
    "abstract swirls of blue and gold paint",
    "a robot reading a book in a library, cinematic",
    "close-up of a hand holding a glass marble with a galaxy inside",
    # longer than CLIP's 77 tokens: exercises truncation
    "a snowy cabin with warm light in the windows, " + "cozy winter evening, " * 4,
    "black and white photograph of a train station in 1920",
    "a plate of colorful macarons on a marble table",
    "low-poly 3d render of a deer",
    "stained glass window depicting a phoenix",
    "an astronaut riding a horse on mars",
]
SEEDS = [0, 1, 42, 1234, 2**32 - 1, 2**32, 2**63 - 1, 987654321]
NEGATIVE = ["", "blurry, low quality", "text, watermark"]
SIZES = [(64, 64), (64, 64), (64, 96), (96, 64)]  # tiny-model friendly; --set to render larger


def rows() -> list[dict]:
    out = []
    for n, prompt in enumerate(PROMPTS):
        w, h = SIZES[n % len(SIZES)]
        out.append({
            "id": f"reg-{n:03d}",
            "prompt": prompt,
            "seed": SEEDS[n % len(SEEDS)],
            "negative_prompt": NEGATIVE[n % len(NEGATIVE)],
            "width": w,
            "height": h,
            "steps": 8 if n % 5 else 12,
            "guidance_scale": [7.5, 5.0, 1.0, 12.0][n % 4],
        })
    return out


def main(argv: list[str]) -> None:
    target = Path(argv[0]) if argv else Path(__file__).with_name("regression.parquet")
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
                        ("negative_prompt", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                        ("steps", pa.int32()), ("guidance_scale", pa.float64())])
    pq.write_table(pa.Table.from_pylist(rows(), schema=schema), target)
    print(f"wrote {len(PROMPTS)} prompts to {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
