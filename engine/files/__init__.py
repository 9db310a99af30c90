"""Files in and out: images (8/16-bit, EXIF, the pixel limit), label maps, overlays, the JSON record and radius
maps, written atomically."""
