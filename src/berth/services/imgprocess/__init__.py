"""imgprocess: UPYUN-style image processing on libvips."""
