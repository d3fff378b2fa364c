"""Scale-out experiments (`asoftmax.sharded`): the three methods on device meshes."""
