"""transport/grpc"""
