#!/usr/bin/env python3
"""Writes the small image fixtures that the `image` crate cannot make itself (it encodes no
CMYK JPEG): models/tests/fixtures/images/cmyk.jpg, 16x8, pure red in CMYK (C=0 M=255 Y=255 K=0).
Pillow 11+. Rerun: pip install pillow && python3 scripts/make_image_fixtures.py
"""
from pathlib import Path

from PIL import Image

out = Path(__file__).resolve().parent.parent / "models/tests/fixtures/images"
out.mkdir(parents=True, exist_ok=True)
Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(out / "cmyk.jpg", quality=95)
print("wrote", out / "cmyk.jpg")
