"""Everything that touches Megatron-Core internals lives in this subpackage, and nothing else does."""
