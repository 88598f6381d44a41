"""Everything that exists only to run on a machine without CUDA, in one place.

- ``compat``: the patches megatron-core needs to run on CPU (gloo, fp32, the local layer spec).
- ``linear``: the matrix multiply of megatron's tensor-parallel linear layers on CPU.
- ``memory``: glibc heap settings (keep freed memory for reuse; give it back to the OS).
- ``threads``: scoping torch's CPU thread count, and undoing what vLLM's CPU worker does to it.

Nothing here imports the rest of ``pear_mega`` beyond ``pear_mega.platform``: the models, the
optimizer and the engine call into it, never the other way round. Host staging of the weight sync
(``pear_mega.models.staging``) is CPU-only too but lays out the model's HF tensors, so it stays
with the model's name mapping.
"""
