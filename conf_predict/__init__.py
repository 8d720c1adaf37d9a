"""segtrain.predict's own config groups (the benchmark file formats), installed as
``segtrain/conf_predict`` (the link segtrain/conf_predict -> ../conf_predict) and found through
``hydra.searchpath`` in conf/predict.yaml: outside conf/, training neither lists nor takes them.
"""
