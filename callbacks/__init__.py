"""Per-layer callbacks used around block forwards (e.g. on-device GGUF dequantization)."""
