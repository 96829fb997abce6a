"""The `labelbox` backend: items become Labelbox data rows over Labelbox's GraphQL API
(sink.py on the shared kit; graphql.py the API's requests and answers; rows.py how an
item becomes a row; metadata.py the metadata ontology)."""

from ingestd.sinks.labelbox.rows import fetchable_url, global_key
from ingestd.sinks.labelbox.sink import LabelboxSink

__all__ = ["LabelboxSink", "fetchable_url", "global_key"]
