import json, shutil, sys, numpy as np
from pathlib import Path
src=Path(sys.argv[1]); tag=sys.argv[2]; root=src.parent
cases=sorted(p.name[:-len('.nii.gz')] for p in (src/'labelsTr').glob('*.nii.gz'))
patients=sorted({c.split('_')[0] for c in cases})
rng=np.random.default_rng(0); expert=set(rng.choice(patients, 10, replace=False).tolist())
ex=root/f'{tag}_expert10'; ex.mkdir(exist_ok=True)
test=root/f'{src.name}_Test40'; (test/'imagesTr').mkdir(parents=True, exist_ok=True); (test/'labelsTr').mkdir(exist_ok=True)
meta=json.load(open(src/'rl_adapt_meta.json'))
n=0
for c in cases:
    if c.split('_')[0] in expert: shutil.copy(src/'labelsTr'/f'{c}.nii.gz', ex/f'{c}.nii.gz')
    else:
        shutil.copy(src/'imagesTr'/f'{c}_0000.nii.gz', test/'imagesTr'/f'{c}_0000.nii.gz'); shutil.copy(src/'labelsTr'/f'{c}.nii.gz', test/'labelsTr'/f'{c}.nii.gz'); n+=1
dj=json.load(open(src/'dataset.json')); dj['numTraining']=n; dj['name']+='Test40'; json.dump(dj, open(test/'dataset.json','w'), indent=2)
mc=meta['cases']
meta['cases']={k:v for k,v in mc.items() if k.split('_')[0] not in expert} if isinstance(mc,dict) else [v for v in mc if str(v.get('name', v.get('patient',''))).split('_')[0] not in expert]
meta['dataset_name']=test.name; json.dump(meta, open(test/'rl_adapt_meta.json','w'), indent=1)
print('expert patients', sorted(expert), 'test images', n, 'meta cases', len(meta['cases']))
