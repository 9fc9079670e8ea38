# src: a C-contiguous buffer or a Pillow "arrow_array" capsule; dst, table: buffers (see _kernels.c).
def resample(
    src: object,
    src_w: int,
    src_h: int,
    dst: object,
    dst_w: int,
    dst_h: int,
    filter: int,
    order: int,
    window: tuple[int, int, int, int],
) -> None: ...
def patchify(
    src: object, w: int, h: int, dst: object, table: object, itemsize: int, patch: int, merge: int, temporal: int
) -> None: ...
def simd() -> str: ...
def set_simd(on: bool) -> None: ...
