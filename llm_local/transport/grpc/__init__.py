"""The gRPC transport: grpclib services run on trio through one bridge (bridge.py).

services.py (the two generation services), health.py (grpc.health.v1 from the service
state), messages.py (wire <-> core types), server.py (listening, reflection, graceful
stop). Only bridge.py touches trio-asyncio.
"""
