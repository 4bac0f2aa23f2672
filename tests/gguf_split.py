"""Splits a GGUF file into parts with llama.cpp's own Python writer (gguf-py's GGUFWriter,
split_max_tensors), the way `convert_hf_to_gguf.py --split-max-tensors` does.

usage: python3 gguf_split.py SRC.gguf OUT_DIR/NAME.gguf TENSORS_PER_PART
writes OUT_DIR/NAME-00001-of-0000N.gguf ... and prints their paths.
"""

import sys

from gguf import GGUFReader, GGUFValueType, GGUFWriter


def main() -> None:
    src, out, per_part = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reader = GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    writer = GGUFWriter(out, arch, split_max_tensors=per_part)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        # GGUFReader gives quantized tensors as bytes, [rows, bytes per row], which is the
        # shape the writer takes with their type.
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
