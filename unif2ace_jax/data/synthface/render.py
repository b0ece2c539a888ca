"""PIL rendering of a stylised SynthFace portrait from its attributes.

Drawing happens on a canvas 2-4x larger than the output and is box-filtered down, which
antialiases edges. Geometry is written in face units: (0, 0) is the face centre and 1 unit is
the image width times the face scale, so features scale and move together with the jittered
head. Layer order (back to front): background, back hair, neck and shirt, hair over the
shoulders, ears and earrings, face, freckles, beard, mouth, moustache, nose, eyes, glasses,
front hair, eyebrows, hat. Every attribute stays visible whatever the others are: hats and
fringes stop above the eyebrows, eyebrows are drawn over glasses frames, ears and earrings sit
on top of the hair, the beard leaves the mouth and moustache area free, hair style shows at the
sides and below the ears under any hat.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from unif2ace_jax.data.synthface.attributes import validate_attributes
from unif2ace_jax.errors import UserError

Color = tuple[int, int, int]

HAIR_COLORS: dict[str, Color] = {
    "black": (28, 24, 24),
    "brown": (132, 74, 30),
    "blond": (238, 196, 80),
    "red": (205, 62, 24),
    "gray": (168, 168, 176),
}
EYE_COLORS: dict[str, Color] = {
    "blue": (30, 100, 235),
    "green": (30, 170, 55),
    "amber": (235, 150, 15),
    "violet": (160, 50, 215),
}
SKIN_TONES: dict[str, Color] = {
    "fair": (252, 222, 202),
    "medium": (226, 178, 136),
    "tan": (188, 128, 82),
    "dark": (98, 60, 42),
}
BACKGROUNDS: dict[str, Color] = {
    "white": (242, 242, 242),
    "yellow": (250, 222, 80),
    "orange": (245, 140, 50),
    "teal": (30, 150, 150),
    "pink": (246, 164, 200),
}
SHIRT_COLORS: dict[str, Color] = {
    "maroon": (122, 22, 44),
    "olive": (118, 124, 36),
    "navy": (28, 38, 104),
    "cream": (240, 226, 176),
}
LIPSTICK_COLORS: dict[str, Color] = {"crimson": (210, 16, 44), "purple": (128, 34, 156)}
# Hat colours are nuisance (not an attribute); none of them is a hair colour.
HAT_COLORS: tuple[Color, ...] = ((44, 84, 172), (46, 122, 62), (96, 52, 126))
GOLD: Color = (250, 196, 30)
GOLD_EDGE: Color = (110, 70, 0)
FRAME: Color = (24, 24, 28)

TURN_SHIFT = {"left": -0.055, "frontal": 0.0, "right": 0.055}
# Face half-width / half-height (face units) per shape.
FACE_SIZE = {"oval": (0.165, 0.25), "round": (0.2, 0.215), "square": (0.19, 0.23),
             "heart-shaped": (0.195, 0.25)}
# Vertical layout (face units, y down). Hat brims, fringes and curls stay above -0.135 so the
# eyebrows (arched top edge at about -0.133) are never covered; brows are drawn over glasses.
EYE_Y, EYE_DX = -0.035, 0.085
BROW_Y = EYE_Y - 0.063
NOSE_Y = 0.047
MOUTH_Y = 0.155
HAIRLINE_Y = -0.152
FRECKLE_Y = 0.045  # freckles span about 0.02..0.07 on the cheeks, inside the beard band
BEARD_TOP_Y = 0.0  # full beard and stubble: jaw band from ear level down


def _scale(color: Color, factor: float) -> Color:
    return tuple(int(max(0, min(255, round(c * factor)))) for c in color)  # type: ignore


def _mix(a: Color, b: Color, t: float) -> Color:
    return tuple(int(round((1 - t) * x + t * y)) for x, y in zip(a, b))  # type: ignore


def _contrasting(hair: Color, skin: Color, min_distance: float = 90.0) -> Color:
    """Shade of the hair colour for brows, moustache and beard edges that stands out on skin."""
    best, best_d = hair, -1.0
    for factor in (0.72, 0.5, 1.0, 0.3, 1.25):
        c = _scale(hair, factor)
        d = float(np.linalg.norm(np.subtract(c, skin, dtype=float)))
        if d >= min_distance:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _face_outline(shape: str, hw: float, hh: float, n: int = 40) -> list[tuple[float, float]]:
    """Closed outline of the face in face units, clockwise from the left cheek over the top."""
    u = np.linspace(-1.0, 1.0, n)
    top_exp = 5.0 if shape == "square" else 2.0
    top = -hh * (1.0 - np.abs(u) ** top_exp) ** (1.0 / top_exp)
    if shape == "square":
        bottom = (1.0 - np.abs(u) ** 5) ** 0.2
    elif shape == "heart-shaped":
        bottom = (1.0 - np.abs(u)) ** 0.75
    else:
        bottom = np.sqrt(1.0 - u**2)
    points = [(hw * x, y) for x, y in zip(u, top)]
    points += [(hw * x, hh * y) for x, y in zip(u[::-1], bottom[::-1])]
    return points


class _Painter:
    """Maps face units to canvas pixels and wraps the ImageDraw calls used by the renderer."""

    def __init__(self, image: Image.Image, cx: float, cy: float, scale: float):
        self.image = image
        self.draw = ImageDraw.Draw(image)
        self.size = image.size[0]
        self.cx, self.cy, self.scale = cx, cy, scale

    def p(self, x: float, y: float) -> tuple[float, float]:
        k = self.size * self.scale
        return (self.cx * self.size + x * k, self.cy * self.size + y * k)

    def w(self, width: float) -> int:
        return max(1, int(round(width * self.size * self.scale)))

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [*self.p(x0, y0), *self.p(x1, y1)]

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill=None, outline=None,
                width: float = 0.0) -> None:
        self.draw.ellipse(self.box(x - rx, y - ry, x + rx, y + ry), fill=fill, outline=outline,
                          width=self.w(width) if outline is not None else 0)

    def polygon(self, points, fill, outline=None, width: float = 0.0) -> None:
        self.draw.polygon([self.p(x, y) for x, y in points], fill=fill, outline=outline,
                          width=self.w(width) if outline is not None else 0)

    def line(self, points, fill, width: float) -> None:
        self.draw.line([self.p(x, y) for x, y in points], fill=fill, width=self.w(width),
                       joint="curve")

    def rect(self, x0, y0, x1, y1, fill, radius: float = 0.0, outline=None, width=0.0) -> None:
        self.draw.rounded_rectangle(self.box(x0, y0, x1, y1),
                                    radius=self.w(radius) if radius else 0,
                                    fill=fill, outline=outline,
                                    width=self.w(width) if outline is not None else 0)


def _curve(x0: float, x1: float, y: float, bend: float, n: int = 9) -> list[tuple[float, float]]:
    """Parabola from x0 to x1 whose ends are `bend` higher (negative y) than its middle."""
    xs = np.linspace(x0, x1, n)
    mid, half = (x0 + x1) / 2, (x1 - x0) / 2
    return [(float(x), float(y - bend * ((x - mid) / half) ** 2)) for x in xs]


def render(attributes: dict[str, str], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws one face. Returns uint8 [image_size, image_size, 3].

    `rng` supplies the nuisance variation only (sub-feature jitter of position, scale and
    shades); the same rng state and attributes give the same image.
    """
    validate_attributes(attributes)
    if not isinstance(image_size, (int, np.integer)) or image_size < 32 or image_size % 32:
        raise UserError(f"image_size must be a positive multiple of 32 (>= 32), got {image_size}")
    a = attributes
    ss = max(2, -(-256 // int(image_size)))  # supersampling factor
    canvas = int(image_size) * ss

    jitter = rng.uniform(-1.0, 1.0, size=8)
    shade = lambda c, k: _scale(c, 1.0 + 0.04 * jitter[k])  # noqa: E731
    bg = shade(BACKGROUNDS[a["background"]], 0)
    skin = shade(SKIN_TONES[a["skin_tone"]], 1)
    hair = shade(HAIR_COLORS[a["hair_color"]], 2)
    shirt = shade(SHIRT_COLORS[a["shirt_color"]], 3)
    hat_color = HAT_COLORS[int(rng.integers(len(HAT_COLORS)))]
    image = Image.new("RGB", (canvas, canvas), bg)
    pt = _Painter(image, cx=0.5 + 0.015 * jitter[4], cy=0.47 + 0.012 * jitter[5],
                  scale=1.12 * (1.0 + 0.03 * jitter[6]))

    hw, hh = FACE_SIZE[a["face_shape"]]
    dx = TURN_SHIFT[a["head_turn"]]
    outline = _face_outline(a["face_shape"], hw, hh)
    hair_dark = _contrasting(hair, skin)  # brows, moustache, beard
    hair_edge = _scale(hair, 0.55) if a["hair_color"] != "black" else (80, 76, 76)
    skin_shadow = _scale(skin, 0.78)

    _draw_back_hair(pt, a["hair_style"], hair, hair_edge, hw, hh)
    # Neck and shirt.
    pt.rect(-0.075, 0.1, 0.075, 0.45, fill=_scale(skin, 0.92))
    pt.ellipse(0.0, 0.62, 0.4, 0.26, fill=shirt)
    pt.polygon([(-0.08, hh + 0.1), (0.08, hh + 0.1), (0.0, hh + 0.19)], fill=_scale(skin, 0.92))
    _draw_shoulder_hair(pt, a["hair_style"], hair, hair_edge, hw, hh)
    _draw_ears(pt, a["earrings"], skin, skin_shadow, hw)
    pt.polygon(outline, fill=skin, outline=_scale(skin, 0.62), width=0.008)
    if a["freckles"] == "freckled":
        _draw_freckles(pt, a["skin_tone"], dx, rng)
    _draw_beard(pt, a["beard"], outline, hair_dark, dx, hh, rng)
    _draw_mouth(pt, a["expression"], a["lipstick"], skin, dx)
    _draw_moustache(pt, a["moustache"], hair_dark, dx)
    # Noses are shaded darker on light skin and lighter on dark skin, to stay visible.
    nose_shade = _scale(skin, 1.5) if sum(skin) < 330 else _scale(skin, 0.68)
    _draw_nose(pt, a["nose"], nose_shade, dx)
    _draw_eyes(pt, EYE_COLORS[a["eye_color"]], dx)
    _draw_glasses(pt, a["glasses"], dx, hw)
    _draw_front_hair(pt, a["hair_style"], hair, hair_edge, hw, hh)
    _draw_brows(pt, a["eyebrows"], hair_dark, dx)
    _draw_hat(pt, a["hat"], hat_color, hw, hh, dx)

    out = image.reduce(ss) if canvas != image_size else image
    return np.asarray(out, dtype=np.uint8)


def _draw_back_hair(pt: _Painter, style: str, hair: Color, edge: Color, hw: float,
                    hh: float) -> None:
    """Hair behind the head: a union of ellipses ("e", x, y, rx, ry) and rounded rectangles
    ("r", x0, y0, x1, y1, radius), drawn first grown in the edge colour, then filled."""
    top = -hh - 0.045
    shapes: list[tuple] = []
    if style == "short":
        shapes = [("e", 0.0, -0.06, hw + 0.025, hh - 0.03)]
    elif style == "bob":
        shapes = [("r", -hw - 0.065, top + 0.03, hw + 0.065, hh * 0.72, 0.08),
                  ("e", 0.0, -0.07, hw + 0.065, hh)]
    elif style == "long":
        shapes = [("e", 0.0, -0.05, hw + 0.06, hh + 0.02),
                  ("r", -hw - 0.06, -0.05, hw + 0.06, 0.42, 0.03)]
    elif style == "curly":
        shapes = [("e", 0.0, -0.04, hw + 0.09, hh + 0.04)]
    elif style == "braided":
        shapes = [("e", 0.0, -0.05, hw + 0.035, hh + 0.01)]
    for grow, color in ((0.009, edge), (0.0, hair)):
        for shape in shapes:
            if shape[0] == "e":
                _, x, y, rx, ry = shape
                pt.ellipse(x, y, rx + grow, ry + grow, fill=color)
            else:
                _, x0, y0, x1, y1, r = shape
                pt.rect(x0 - grow, y0 - grow, x1 + grow, y1 + grow, fill=color, radius=r)
    if style == "bob":
        pt.line([(-hw - 0.06, hh * 0.72 - 0.006), (hw + 0.06, hh * 0.72 - 0.006)], edge, 0.008)
    elif style == "curly":
        for ang in np.linspace(-200, 20, 13):
            t = math.radians(ang)
            x, y = (hw + 0.085) * math.cos(t), -0.04 + (hh + 0.035) * math.sin(t)
            pt.ellipse(x, y, 0.052, 0.052, fill=hair, outline=edge, width=0.009)
        pt.ellipse(0.0, -0.04, hw + 0.075, hh + 0.02, fill=hair)


def _draw_shoulder_hair(pt: _Painter, style: str, hair: Color, dark: Color, hw: float,
                        hh: float) -> None:
    if style == "long":
        for side in (-1, 1):
            x0 = side * (hw + 0.06)
            x1 = side * (hw - 0.035)
            pt.rect(min(x0, x1), -0.05, max(x0, x1), 0.6, fill=hair, radius=0.03, outline=dark,
                    width=0.008)
            xm = (x0 + x1) / 2
            pt.line([(xm, 0.05), (xm, 0.55)], dark, 0.008)
    elif style == "braided":
        for side in (-1, 1):
            x = side * (hw + 0.035)
            for k in range(7):
                y = 0.06 + 0.068 * k
                pt.ellipse(x, y, 0.038, 0.042, fill=hair, outline=dark, width=0.01)
            pt.ellipse(x, 0.06 + 0.068 * 7 - 0.01, 0.02, 0.03, fill=dark)


def _draw_ears(pt: _Painter, earrings: str, skin: Color, shadow: Color, hw: float) -> None:
    for side in (-1, 1):
        x = side * (hw + 0.012)
        pt.ellipse(x, 0.0, 0.036, 0.058, fill=skin)
        pt.ellipse(x + side * 0.006, 0.0, 0.016, 0.03, fill=shadow)
        lobe = (x + side * 0.004, 0.05)
        if earrings == "studs":
            pt.ellipse(*lobe, 0.022, 0.022, fill=GOLD, outline=GOLD_EDGE, width=0.008)
        elif earrings == "hoops":
            pt.ellipse(lobe[0], lobe[1] + 0.045, 0.042, 0.048, outline=GOLD_EDGE, width=0.022)
            pt.ellipse(lobe[0], lobe[1] + 0.045, 0.036, 0.042, outline=GOLD, width=0.011)


def _draw_freckles(pt: _Painter, skin_tone: str, dx: float, rng: np.random.Generator) -> None:
    color = (214, 150, 96) if skin_tone == "dark" else (140, 70, 34)
    base = [(-0.02, -0.01), (0.018, -0.016), (0.036, 0.004), (-0.034, 0.008), (0.0, 0.01),
            (0.02, 0.026), (-0.018, 0.03)]
    jitter = rng.uniform(-0.006, 0.006, size=(2, len(base), 2))
    for side_i, side in enumerate((-1, 1)):
        for (x, y), (jx, jy) in zip(base, jitter[side_i]):
            pt.ellipse(dx * 0.6 + side * 0.108 + x + jx, FRECKLE_Y + y + jy, 0.011, 0.011,
                           fill=color)


def _beard_mask(pt: _Painter, outline, dx: float) -> tuple[Image.Image, tuple[int, int]]:
    """Jaw band from ear level down plus the whole chin below the mouth, minus the mouth area.

    Returns an "L" mask covering only the lower face and its top-left canvas offset.
    """
    grown = [pt.p(x * 1.08, y * 1.08 + 0.008) for x, y in outline]
    x0 = int(min(p[0] for p in grown)) - 1
    y0 = int(pt.p(0, BEARD_TOP_Y)[1])
    x1, y1 = int(max(p[0] for p in grown)) + 2, int(max(p[1] for p in grown)) + 2
    shift = lambda pts: [(x - x0, y - y0) for x, y in pts]  # noqa: E731
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    md = ImageDraw.Draw(mask)
    md.polygon(shift(grown), fill=255)
    inner = [pt.p(x * 0.74 + dx * 0.5, min(y, MOUTH_Y + 0.03)) for x, y in outline]
    md.polygon(shift(inner), fill=0)
    x, y, rx, ry = dx, MOUTH_Y - 0.01, 0.085, 0.045
    md.ellipse(shift([pt.p(x - rx, y - ry), pt.p(x + rx, y + ry)]), fill=0)
    return mask, (x0, y0)


def _draw_beard(pt, beard, outline, dark, dx, hh, rng) -> None:
    if beard == "full":
        mask, offset = _beard_mask(pt, outline, dx)
        pt.image.paste(dark, (*offset, offset[0] + mask.size[0], offset[1] + mask.size[1]), mask)
    elif beard == "stubble":
        region, (ox, oy) = _beard_mask(pt, outline, dx)
        dots = Image.new("L", region.size, 0)
        dd = ImageDraw.Draw(dots)
        for x, y in rng.uniform(-1, 1, size=(110, 2)):
            px, py = pt.p(x * 0.2, BEARD_TOP_Y + (y + 1) * 0.5 * (hh + 0.02 - BEARD_TOP_Y))
            r = pt.size * pt.scale * 0.006
            dd.ellipse([px - ox - r, py - oy - r, px - ox + r, py - oy + r], fill=255)
        shade = region.point(lambda v: v * 90 // 255)
        mask = ImageChops.lighter(shade, ImageChops.multiply(dots, region))
        pt.image.paste(dark, (ox, oy, ox + mask.size[0], oy + mask.size[1]), mask)
    elif beard == "goatee":
        chin = hh
        shape = [(dx - 0.05, MOUTH_Y + 0.03), (dx + 0.05, MOUTH_Y + 0.03),
                 (dx * 0.6 + 0.04, chin + 0.02), (dx * 0.6, chin + 0.05),
                 (dx * 0.6 - 0.04, chin + 0.02)]
        pt.polygon(shape, fill=dark, outline=_scale(dark, 0.7), width=0.008)


def _lip_color(lipstick: str, skin: Color) -> Color:
    if lipstick in LIPSTICK_COLORS:
        return LIPSTICK_COLORS[lipstick]
    return _mix(skin, (200, 80, 80), 0.55)


def _draw_mouth(pt: _Painter, expression: str, lipstick: str, skin: Color, dx: float) -> None:
    lips = _lip_color(lipstick, skin)
    seam = (70, 22, 26)
    x, y, half = dx, MOUTH_Y, 0.065
    if expression in ("smiling", "neutral", "frowning"):
        bend = {"smiling": 0.03, "neutral": 0.0, "frowning": -0.03}[expression]
        points = _curve(x - half, x + half, y, bend)
        pt.line(points, lips, 0.036)
        pt.line(points, seam, 0.012)
    elif expression == "surprised":
        pt.ellipse(x, y + 0.005, 0.036, 0.042, fill=seam, outline=lips, width=0.018)
    elif expression == "laughing":
        top = y - 0.02
        points = _curve(x - half, x + half, top + 0.07, 0.07)
        points = [(x - half - 0.008, top)] + points + [(x + half + 0.008, top)]
        pt.polygon(points, fill=seam)
        pt.rect(x - half + 0.01, top, x + half - 0.01, top + 0.02, fill=(250, 250, 250))
        pt.line(points + [points[0]], lips, 0.016)


def _draw_moustache(pt: _Painter, moustache: str, color: Color, dx: float) -> None:
    y = MOUTH_Y - 0.053
    if moustache == "pencil":
        pt.line([(dx - 0.058, y + 0.004), (dx, y), (dx + 0.058, y + 0.004)], color, 0.016)
    elif moustache == "chevron":
        pt.polygon([(dx - 0.048, y - 0.018), (dx + 0.048, y - 0.018), (dx + 0.07, y + 0.016),
                    (dx - 0.07, y + 0.016)], fill=color)
    elif moustache == "handlebar":
        pt.line([(dx - 0.1, y - 0.045), (dx - 0.095, y - 0.006), (dx - 0.05, y + 0.008), (dx, y),
                 (dx + 0.05, y + 0.008), (dx + 0.095, y - 0.006), (dx + 0.1, y - 0.045)],
                color, 0.02)


def _draw_nose(pt: _Painter, nose: str, shadow: Color, dx: float) -> None:
    x, y = dx * 1.2, NOSE_Y
    nostril = _scale(shadow, 0.6 if sum(shadow) < 450 else 1.3)
    if nose == "button":
        pt.ellipse(x, y - 0.005, 0.018, 0.016, fill=shadow)
    elif nose == "wide":
        pt.ellipse(x, y - 0.004, 0.058, 0.024, fill=shadow)
        for side in (-1, 1):
            pt.ellipse(x + side * 0.032, y + 0.004, 0.014, 0.009, fill=nostril)
    elif nose == "pointed":
        tip = x + 0.6 * dx
        pt.polygon([(x - 0.014, EYE_Y + 0.015), (x + 0.014, EYE_Y + 0.015), (tip + 0.03, y + 0.014),
                    (tip - 0.03, y + 0.014)], fill=shadow)
        pt.polygon([(tip - 0.026, y + 0.014), (tip + 0.026, y + 0.014), (tip, y + 0.03)],
                   fill=nostril)


def _draw_eyes(pt: _Painter, iris: Color, dx: float) -> None:
    for side in (-1, 1):
        x = dx + side * EYE_DX
        pt.ellipse(x, EYE_Y, 0.053, 0.04, fill=(255, 255, 255), outline=(40, 30, 30), width=0.008)
        ix = x + dx * 0.25
        pt.ellipse(ix, EYE_Y, 0.033, 0.033, fill=iris)
        pt.ellipse(ix, EYE_Y, 0.013, 0.013, fill=(10, 10, 10))
        pt.ellipse(ix + 0.01, EYE_Y - 0.012, 0.006, 0.006, fill=(255, 255, 255))


def _draw_brows(pt: _Painter, brows: str, color: Color, dx: float) -> None:
    for side in (-1, 1):
        x = dx + side * EYE_DX
        inner, outer = x - side * 0.05, x + side * 0.058
        if brows == "thin":
            pt.line([(inner, BROW_Y + 0.004), (x, BROW_Y - 0.006), (outer, BROW_Y + 0.004)], color,
                    0.013)
        elif brows == "bushy":
            pt.line([(inner, BROW_Y), (x, BROW_Y - 0.006), (outer, BROW_Y + 0.002)], color, 0.034)
        elif brows == "arched":
            pt.line([(inner, BROW_Y + 0.008), (x + side * 0.012, BROW_Y - 0.026),
                     (outer, BROW_Y + 0.012)], color, 0.018)


def _draw_glasses(pt: _Painter, glasses: str, dx: float, hw: float) -> None:
    if glasses == "none":
        return
    for side in (-1, 1):
        x = dx + side * EYE_DX
        if glasses == "circular":
            pt.ellipse(x, EYE_Y, 0.062, 0.062, outline=FRAME, width=0.013)
            edge = x + side * 0.062
        else:
            pt.rect(x - 0.072, EYE_Y - 0.05, x + 0.072, EYE_Y + 0.05, fill=None, radius=0.012,
                    outline=FRAME, width=0.015)
            edge = x + side * 0.072
        pt.line([(edge, EYE_Y - 0.01), (side * (hw + 0.005), EYE_Y - 0.02)], FRAME, 0.01)
    gap = 0.062 if glasses == "circular" else 0.072
    pt.line([(dx - EYE_DX + gap, EYE_Y - 0.01), (dx, EYE_Y - 0.02),
             (dx + EYE_DX - gap, EYE_Y - 0.01)],
            FRAME, 0.011)


def _draw_front_hair(pt: _Painter, style: str, hair: Color, dark: Color, hw: float,
                     hh: float) -> None:
    top = -hh - 0.03
    cap = [(hw * 1.06 * math.cos(t), HAIRLINE_Y + (HAIRLINE_Y - top) * math.sin(t))
           for t in np.linspace(math.pi, 2 * math.pi, 24)]
    # Sideburns reaching the ears on both sides (visible under any hat).
    for side in (-1, 1):
        pt.polygon([(side * (hw + 0.01), HAIRLINE_Y - 0.04), (side * (hw - 0.035), HAIRLINE_Y),
                    (side * (hw - 0.02), -0.03), (side * (hw + 0.01), -0.04)], fill=hair)
    if style == "short":
        pt.polygon(cap + [(hw * 0.4, HAIRLINE_Y - 0.01), (0.0, HAIRLINE_Y + 0.012),
                          (-hw * 0.4, HAIRLINE_Y - 0.01)], fill=hair)
    elif style == "bob":
        pt.polygon(cap + [(hw * 1.06, HAIRLINE_Y + 0.01), (-hw * 1.06, HAIRLINE_Y + 0.01)],
                   fill=hair)
    elif style == "long":
        pt.polygon(cap + [(hw * 0.2, HAIRLINE_Y - 0.03), (-hw * 0.6, HAIRLINE_Y + 0.015)],
                   fill=hair)
        pt.line([(-hw * 0.6, HAIRLINE_Y + 0.012), (hw * 0.2, HAIRLINE_Y - 0.028)], dark, 0.006)
    elif style == "curly":
        pt.polygon(cap, fill=hair)
        for x in np.linspace(-hw * 0.9, hw * 0.9, 6):
            pt.ellipse(float(x), HAIRLINE_Y - 0.008, 0.038, 0.028, fill=hair, outline=dark,
                       width=0.007)
    elif style == "braided":
        pt.polygon(cap + [(0.0, HAIRLINE_Y - 0.04)], fill=hair)
        pt.line([(0.0, top + 0.01), (0.0, HAIRLINE_Y - 0.04)], dark, 0.01)


def _draw_hat(pt: _Painter, hat: str, color: Color, hw: float, hh: float, dx: float) -> None:
    if hat == "none":
        return
    dark = _scale(color, 0.6)
    brim_y = HAIRLINE_Y - 0.025
    if hat == "beanie":
        pt.draw.chord(pt.box(-hw - 0.04, -hh - 0.12, hw + 0.04, brim_y + 0.09), 180, 360,
                      fill=color)
        pt.rect(-hw - 0.045, brim_y - 0.045, hw + 0.045, brim_y + 0.0, fill=dark, radius=0.015)
        pt.ellipse(0.0, -hh - 0.12, 0.04, 0.04, fill=_scale(color, 1.25))
    elif hat == "cap":
        pt.draw.chord(pt.box(-hw - 0.03, -hh - 0.07, hw + 0.03, brim_y + 0.07), 180, 360,
                      fill=color)
        # Peak seen from the front: a dark crescent under the crown, shifted with the head turn.
        pt.draw.chord(pt.box(dx * 0.8 - hw - 0.02, brim_y - 0.05, dx * 0.8 + hw + 0.02,
                             brim_y + 0.04),
                      0, 180, fill=dark)
        pt.ellipse(0.0, -hh - 0.065, 0.016, 0.01, fill=dark)
    elif hat == "top hat":
        pt.rect(-0.135, brim_y - 0.25, 0.135, brim_y, fill=color)
        pt.rect(-0.135, brim_y - 0.075, 0.135, brim_y - 0.035, fill=dark)
        pt.rect(-hw - 0.085, brim_y - 0.02, hw + 0.085, brim_y + 0.012, fill=color, radius=0.01)
