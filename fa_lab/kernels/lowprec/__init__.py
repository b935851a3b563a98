"""Low precision: 512-bit vector intrinsics (`zmm`), register-blocked micro-kernels
(`microkernels`), the vector softmax (`vsoftmax`), INT8 quantization (`quantize`), the
plain-loop INT8 kernels (`int8`) and the SageAttention-style kernel (`sage`)."""
