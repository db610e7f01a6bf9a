"""Schemathesis hooks for scripts/schemathesis.sh.

`POST /requests` refuses a submission that gives one guest destination twice (`422`, as its
document says), a rule JSON Schema cannot state: `uniqueItems` compares whole items, not their
`path`. A schema-valid case that breaks it is not sent as a positive one; every other case is.
"""

import schemathesis

# The destination the document's `Content-Disposition` example gives every generated file part.
FILE_PART_DESTINATION = "/root/upload.bin"


def _normalised(path):
    return "/".join(c for c in path.split("/") if c)


def _destinations(case):
    body = case.body
    if not isinstance(body, dict):
        return []
    multipart = (case.media_type or "").startswith("multipart/")
    request = body.get("request") if multipart else body
    paths = []
    if isinstance(request, dict) and isinstance(request.get("files"), list):
        paths += [f["path"] for f in request["files"] if isinstance(f, dict) and isinstance(f.get("path"), str)]
    if multipart and "file" in body:
        paths.append(FILE_PART_DESTINATION)
    return [_normalised(p) for p in paths]


@schemathesis.hook
def filter_case(context, case):
    if case.operation.method.upper() != "POST" or case.operation.path != "/requests":
        return True
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return True
    destinations = _destinations(case)
    return len(destinations) == len(set(destinations))
