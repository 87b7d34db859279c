"""Serial sources: where a pool product's serials come from when an L3/L4 hands them out over its own protocol."""
