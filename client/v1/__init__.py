"""The generated code's former name, kept as an alias of `headrace.v1`.

`from headrace.client.v1 import inference_pb2` and `import headrace.client.v1.inference_pb2`
give the very modules of `headrace.v1`; new code imports `headrace.v1` directly.
"""

import sys

from headrace.v1 import inference_pb2 as inference_pb2
from headrace.v1 import inference_pb2_grpc as inference_pb2_grpc

sys.modules[f"{__name__}.inference_pb2"] = inference_pb2
sys.modules[f"{__name__}.inference_pb2_grpc"] = inference_pb2_grpc
