"""Studies: a model x compressed variants x perspectives, run as resumable units and compared with dense."""
