"""The proto contract: checked-in generated code matches the .proto files, the public API's
field numbers and names are the published ones, and every element is documented."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from pdserve.protos import generate
from pdserve.v1 import (
    colocated_pb2,
    decode_pb2,
    prefill_pb2,
    router_pb2,
    router_pb2_grpc,
    worker_pb2,
)

# (number, name, type, kind): kind is "optional" (proto3 optional), "repeated", "oneof <name>"
# or "" (a plain singular field). Adding fields is allowed; these must never change.
ROUTER_MESSAGES = {
    "GenerateRequest": [
        (1, "request_id", "string", ""), (2, "prompt", "string", "oneof input"),
        (3, "prompt_token_ids", "TokenIds", "oneof input"), (4, "sampling", "SamplingParams", ""),
    ],
    "TokenIds": [(1, "ids", "uint32", "repeated")],
    "SamplingParams": [
        (1, "max_tokens", "uint32", "optional"), (2, "temperature", "float", "optional"),
        (3, "top_p", "float", "optional"), (4, "top_k", "int32", "optional"),
        (5, "min_p", "float", "optional"), (6, "repetition_penalty", "float", "optional"),
        (7, "presence_penalty", "float", "optional"), (8, "frequency_penalty", "float", "optional"),
        (9, "seed", "uint64", "optional"), (10, "stop", "string", "repeated"),
        (11, "stop_token_ids", "uint32", "repeated"), (12, "ignore_eos", "bool", ""),
        (13, "n", "uint32", "optional"), (14, "logprobs", "uint32", "optional"),
        (15, "min_tokens", "uint32", "optional"), (16, "no_speculation", "bool", ""),
        (17, "prompt_logprobs", "uint32", "optional"),
        (18, "logit_bias", "SamplingParams.LogitBiasEntry", "repeated"),
    ],
    "GenerateResponse": [
        (1, "request_id", "string", ""), (2, "chunk", "TokenChunk", "oneof kind"),
        (3, "complete", "Completion", "oneof kind"), (4, "prompt_logprobs", "PromptLogprobs", "oneof kind"),
    ],
    "PromptLogprobs": [
        (1, "token_ids", "uint32", "repeated"), (2, "logprobs", "float", "repeated"),
        (3, "top_logprobs", "TopLogprobs", "repeated"),
    ],
    "TokenChunk": [
        (1, "index", "uint32", ""), (2, "token_ids", "uint32", "repeated"),
        (3, "text", "string", ""), (4, "logprobs", "float", "repeated"),
        (5, "top_logprobs", "TopLogprobs", "repeated"),
    ],
    "TopLogprobs": [(1, "token_ids", "uint32", "repeated"), (2, "logprobs", "float", "repeated")],
    "Completion": [
        (1, "index", "uint32", ""), (2, "finish_reason", "string", ""),
        (3, "prompt_tokens", "uint32", ""), (4, "completion_tokens", "uint32", ""),
        (5, "cached_tokens", "uint32", ""),
    ],
    "AbortRequest": [(1, "request_id", "string", "")],
    "AbortResponse": [(1, "found", "bool", "")],
    "TokenizeRequest": [(1, "text", "string", ""), (2, "add_special_tokens", "bool", "")],
    "TokenizeResponse": [(1, "ids", "uint32", "repeated"), (2, "count", "uint32", "")],
    "GetModelInfoRequest": [],
    "ModelInfo": [
        (1, "model_name", "string", ""), (2, "architecture", "string", ""),
        (3, "vocab_size", "uint32", ""), (4, "max_model_len", "uint32", ""),
        (5, "eos_token_ids", "uint32", "repeated"), (6, "bos_token_id", "uint32", "optional"),
        (7, "block_size", "uint32", ""),
    ],
}

# service -> (its module, method -> (input, output, server streaming))
SERVICES = {
    "Router": (router_pb2, {
        "Generate": ("GenerateRequest", "GenerateResponse", True),
        "Abort": ("AbortRequest", "AbortResponse", False),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False),
    }),
    "WorkerControl": (worker_pb2, {
        "Abort": ("WorkerAbortRequest", "WorkerAbortResponse", False),
        "GetLoad": ("GetLoadRequest", "WorkerLoad", False),
        "GetWorkerInfo": ("GetWorkerInfoRequest", "WorkerInfo", False),
    }),
    "PrefillWorker": (prefill_pb2, {"Prefill": ("PrefillRequest", "PrefillResponse", False)}),
    "DecodeWorker": (decode_pb2, {
        "Reserve": ("ReserveRequest", "ReserveResponse", False),
        "Decode": ("DecodeRequest", "RequestOutput", True),
    }),
    "ColocatedWorker": (colocated_pb2, {
        "Generate": ("WorkerGenerateRequest", "RequestOutput", True),
    }),
}
ALL_MODULES = (router_pb2, worker_pb2, prefill_pb2, decode_pb2, colocated_pb2)


def _file_proto(module) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


def _field_signature(message: descriptor_pb2.DescriptorProto, field) -> tuple[int, str, str, str]:
    """(number, name, type, kind) of a FieldDescriptorProto, in the tables' notation."""
    if field.type == field.TYPE_MESSAGE:
        type_name = field.type_name.removeprefix(".pdserve.v1.")
    else:
        type_name = field.Type.Name(field.type).removeprefix("TYPE_").lower()
    if field.label == field.LABEL_REPEATED:
        kind = "repeated"
    elif field.proto3_optional:
        kind = "optional"
    elif field.HasField("oneof_index"):
        kind = f"oneof {message.oneof_decl[field.oneof_index].name}"
    else:
        kind = ""
    return field.number, field.name, type_name, kind


def _copy_proto_tree(tmp_path: Path) -> Path:
    root = tmp_path / "protos"
    shutil.copytree(generate.PROTO_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_checked_in_code_matches_the_proto_files():
    assert generate.drifted_files() == []
    assert generate.main(["--check"]) == 0


def test_check_reports_an_edited_proto_and_stale_or_missing_files(tmp_path):
    root = _copy_proto_tree(tmp_path)
    router_proto = root / "pdserve" / "v1" / "router.proto"
    router_proto.write_text(router_proto.read_text().replace(
        "message AbortResponse {", "message AbortResponse {\n  // Added.\n  string note = 2;"))
    (root / "pdserve" / "v1" / "gone_pb2.py").write_text("# generated from a deleted .proto\n")
    (root / "pdserve" / "v1" / "decode_pb2_grpc.py").unlink()
    assert generate.drifted_files(root) == [
        "pdserve/v1/decode_pb2_grpc.py: missing",
        "pdserve/v1/gone_pb2.py: stale (no .proto generates it)",
        "pdserve/v1/router_pb2.py: differs from its .proto",
        "pdserve/v1/router_pb2.pyi: differs from its .proto",
    ]
    generate.write(root)
    assert generate.drifted_files(root) == []
    assert not (root / "pdserve" / "v1" / "gone_pb2.py").exists()


def test_check_ignores_only_the_tool_version_stamps(tmp_path):
    root = _copy_proto_tree(tmp_path)
    v1 = root / "pdserve" / "v1"
    grpc_code = (v1 / "router_pb2_grpc.py").read_text()
    pb2_code = (v1 / "router_pb2.py").read_text()
    assert "Domain.PUBLIC" not in generate.without_version_stamps(pb2_code)
    (v1 / "router_pb2_grpc.py").write_text(
        re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '99.0.0'", grpc_code))
    restamped = re.sub(r"Protobuf Python Version: \S+", "Protobuf Python Version: 99.1.2", pb2_code)
    restamped = re.sub(r"(Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,", r"\g<1>99, 1, 2,", restamped)
    assert restamped != pb2_code
    (v1 / "router_pb2.py").write_text(restamped)
    assert generate.drifted_files(root) == []
    (v1 / "router_pb2.py").write_text(pb2_code.replace("_sym_db = ", "_sym_db  = "))
    assert generate.drifted_files(root) == ["pdserve/v1/router_pb2.py: differs from its .proto"]


def test_generated_modules_import_each_other_as_protoc_wrote_them():
    assert router_pb2_grpc.pdserve_dot_v1_dot_router__pb2 is router_pb2
    assert decode_pb2.pdserve_dot_v1_dot_worker__pb2 is worker_pb2
    assert router_pb2.GenerateRequest.__module__ == "pdserve.v1.router_pb2"
    # protoc's own import lines (`from pdserve.v1 import x_pb2`), not rewritten ones
    assert "from pdserve.v1 import worker_pb2" in Path(decode_pb2.__file__).read_text()
    assert router_pb2.DESCRIPTOR.name == "pdserve/v1/router.proto"
    assert router_pb2.DESCRIPTOR.package == "pdserve.v1"


@pytest.mark.parametrize("message_name", sorted(ROUTER_MESSAGES))
def test_router_messages_keep_their_field_numbers_names_and_types(message_name):
    messages = {m.name: m for m in _file_proto(router_pb2).message_type}
    message = messages[message_name]
    actual = {field.number: _field_signature(message, field) for field in message.field}
    for expected in ROUTER_MESSAGES[message_name]:
        assert actual.get(expected[0]) == expected, f"{message_name} field {expected[0]}"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_services_keep_their_methods(service):
    module, expected_methods = SERVICES[service]
    services = {s.name: s for s in _file_proto(module).service}
    methods = {m.name: m for m in services[service].method}
    for name, (request, response, streaming) in expected_methods.items():
        method = methods[name]
        assert (method.input_type, method.output_type) == (f".pdserve.v1.{request}",
                                                          f".pdserve.v1.{response}")
        assert (method.server_streaming, method.client_streaming) == (streaming, False)


def test_engine_sampling_params_has_every_field_resolved():
    message = worker_pb2.EngineSamplingParams.DESCRIPTOR
    public = set(router_pb2.SamplingParams.DESCRIPTOR.fields_by_name) - {"logprobs"}
    assert public <= set(message.fields_by_name)
    assert {"return_logprobs", "top_logprobs"} <= set(message.fields_by_name)
    optional = [f.name for f in message.fields if f.has_presence and f.message_type is None]
    assert optional == [], "internal sampling params must have no optional scalar fields"


def _documented_locations(file_proto: descriptor_pb2.FileDescriptorProto) -> set[tuple]:
    return {tuple(loc.path) for loc in file_proto.source_code_info.location
            if loc.leading_comments.strip() or loc.trailing_comments.strip()}


def _element_paths(file_proto: descriptor_pb2.FileDescriptorProto):
    """(path, label) of every message, field, oneof, enum, value, service and method."""
    def message_paths(message, path):
        yield path, message.name
        for i, field in enumerate(message.field):
            yield (*path, 2, i), f"{message.name}.{field.name}"
        for i, oneof in enumerate(message.oneof_decl):
            if not oneof.name.startswith("_"):  # proto3 optional's synthetic oneof
                yield (*path, 8, i), f"{message.name}.{oneof.name}"
        for i, nested in enumerate(message.nested_type):
            if not nested.options.map_entry:  # a map<k, v> field's synthetic entry type
                yield from message_paths(nested, (*path, 3, i))
    for i, message in enumerate(file_proto.message_type):
        yield from message_paths(message, (4, i))
    for i, enum in enumerate(file_proto.enum_type):
        yield (5, i), enum.name
        for j, value in enumerate(enum.value):
            yield (5, i, 2, j), f"{enum.name}.{value.name}"
    for i, service in enumerate(file_proto.service):
        yield (6, i), service.name
        for j, method in enumerate(service.method):
            yield (6, i, 2, j), f"{service.name}.{method.name}"


def test_every_proto_element_has_a_comment(tmp_path):
    out = tmp_path / "descriptors.pb"
    generate.run_protoc(["--include_source_info", f"--descriptor_set_out={out}"])
    file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    undocumented = [f"{f.name}: {label}" for f in file_set.file
                    for path, label in _element_paths(f) if path not in _documented_locations(f)]
    assert undocumented == []
    assert {f.name for f in file_set.file} >= {m.DESCRIPTOR.name for m in ALL_MODULES}
