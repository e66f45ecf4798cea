"""Small pieces the GRPO tests share: images of varied sizes and a dense, differentiable-looking reward."""


def image(i):
    "A small picture whose size depends on i, so rows of a batch have different image-patch counts."
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (56 + 28 * (i % 2), 56 + 14 * (i % 3)), "white")
    ImageDraw.Draw(im).rectangle([4, 10 + 3 * i, 30, 50], fill=("red", "green", "blue")[i % 3])
    return im


def share_of_e(completions, **kwargs):
    "The share of 'e' in each completion's text: a reward that differs between samples of a random policy."
    return [c[0]["content"].count("e") / max(len(c[0]["content"]), 1) for c in completions]
