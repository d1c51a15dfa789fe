"""The Triton kernels, one module per op named by the op (``head_affine_capture``,
``residual_steer``, ``neuron_gain``, ``probe_gate``, ``attn_image_boost``), each with a
launcher of the op's name and the reference's signature, plus the shared launch helpers
(``_launch``).

Importing this package imports nothing from Triton: only its modules need it, and the
dispatcher (``emosteer.ops._dispatch``) imports them on first use of ``impl="triton"``.
"""
