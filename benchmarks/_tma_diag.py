import torch
from ring_torch._triton_rows import attend_into, RowsConfig
q,k,v=(torch.randn(4,256,2,64,device='cuda',dtype=torch.bfloat16) for _ in range(3))
o=torch.empty_like(q); l=torch.empty(4,256,2,device='cuda')
try:
    attend_into(q,k,v,o,l,0.125,True,RowsConfig(128,64,4,3,tma=True))
except Exception as e:
    c=e
    while c is not None:
        print(type(c).__name__, str(c)[-1500:]); print('----'); c=c.__cause__ or c.__context__
