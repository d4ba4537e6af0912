"""Planning: what the machine (or a Ray cluster) has, memory per device, the proposed config."""
