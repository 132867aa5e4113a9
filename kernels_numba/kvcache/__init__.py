"""Fast paths of the family (same module paths and signatures as mllm_ref)."""
