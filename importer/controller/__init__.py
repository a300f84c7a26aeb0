"""The DataVolume operator: DataVolume → PVC + importer pod → status.

kopf handlers (`operator`) are thin: they gather what the cluster holds, hand it to pure
functions that plan objects (`plan`) and decide what happens next (`decide`), and carry out
the result. Everything worth testing on its own is a plain function of plain data.
"""
