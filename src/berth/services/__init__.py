"""The processing services berth runs: imageinfo and imgprocess (libvips)."""
