"""Python modules generated from proto/ by scripts/gen_proto. Do not edit; regenerate."""
